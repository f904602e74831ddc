"""Interventions along the refusal direction (Arditi et al.): directional ablation and activation addition."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from refusalscope.interventions.base import Intervention
from refusalscope.interventions.projection import add_direction, like, project_out, unit
from refusalscope.lm.hooks import Hook


class _Directional(Intervention):
    """Shared by interventions along a direction: a (B, d) direction gives each batch row its own."""

    direction: torch.Tensor

    @property
    def per_row(self) -> bool:  # type: ignore[override]
        return self.direction.dim() == 2

    @property
    def uniform(self) -> bool:  # type: ignore[override]
        return not self.per_row

    def select(self, rows):
        return replace(self, direction=self.direction[list(rows)]) if self.per_row else self


@dataclass(frozen=True)
class DirectionAblation(_Directional):
    """Project r̂ out of every layer's input and of every attention/MLP write, at all positions (Arditi et al.)."""

    direction: torch.Tensor  # (d,) or (B, d); normalised here
    layers: tuple[int, ...] | None = None  # None: every layer

    def hooks(self, n_layers: int) -> list[Hook]:
        r = like(unit(self.direction.float()))
        edit = lambda h: project_out(h, r(h))  # noqa: E731
        layers = range(n_layers) if self.layers is None else self.layers
        return [Hook(point, layer, edit) for layer in layers for point in ("resid_pre", "attn_out", "mlp_out")]


@dataclass(frozen=True)
class ActivationAddition(_Directional):
    """Add λ r̂ to the input of one layer at every position (the inverse check: it should induce refusal)."""

    direction: torch.Tensor
    layer: int
    coeff: float = 1.0

    @property
    def uniform(self) -> bool:  # type: ignore[override]
        return not self.per_row and torch.as_tensor(self.coeff).dim() == 0  # a (B,) coeff is per row too

    def hooks(self, n_layers: int) -> list[Hook]:
        r = like(unit(self.direction.float()))
        return [Hook("resid_pre", self.layer, lambda h: add_direction(h, r(h), self.coeff))]
