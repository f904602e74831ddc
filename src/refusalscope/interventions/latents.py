"""SAE latent interventions as hooks: ablate, clamp and record latents at one or more layers, exactly.

Ablation keeps the SAE error term (paper, "Sparse Autoencoders"):
    h' = W_dec (z ⊙ 1_{S'}) + b_dec + (h − W_dec z − b_dec) = h − z_S W_dec[S],
so only the ablated latents' activations z_S are needed. For JumpReLU/ReLU SAEs those cost d × |S| (the fast
path); TopK needs the full encode to know which latents made the top k. Ablating the empty set returns h itself.

Every layer's hook sits on that layer's resid_post, so ablations at several layers compose in one forward pass:
an upstream ablation changes the downstream latents that are then ablated (how dormant "hydra" features show).
A batch may carry one latent set per row: per layer we keep the union U of the rows' sets and a (B, |U|) mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.hooks import Hook, current_attention_mask
from refusalscope.interventions.base import Intervention
from refusalscope.saes.sae import Sae

LatentSet = Mapping[int, Sequence[int]]  # layer -> latent ids


@dataclass(frozen=True)
class LayerPlan:
    """The latents one layer touches: the union ``ids`` of all rows' sets and which row uses which."""

    sae: Sae
    ids: torch.Tensor  # (u,) long
    mask: torch.Tensor | None  # (B, u) float (1 = in the row's set), None: every row uses every id
    sub: Sae | None = None  # the SAE restricted to ``ids`` (independent architectures only)

    def select(self, rows: Sequence[int]) -> "LayerPlan":
        return self if self.mask is None else replace(self, mask=self.mask[list(rows)])


def _restrict(sae: Sae, ids: torch.Tensor) -> Sae | None:
    """The latents ``ids`` of an independent-latent SAE as a narrow SAE (its encode is the fast path)."""
    if not sae.independent:
        return None
    thr = None if sae.threshold is None else sae.threshold[ids]
    return replace(sae, W_enc=sae.W_enc[:, ids].contiguous(), b_enc=sae.b_enc[ids], W_dec=sae.W_dec[ids].contiguous(),
                   threshold=thr)


def plan_sets(saes: Mapping[int, Sae], sets: LatentSet | Sequence[LatentSet]) -> tuple[dict[int, LayerPlan], bool]:
    """Per-layer plans for one set shared by all rows (a mapping) or one set per row (a sequence of mappings)."""
    per_row = not isinstance(sets, Mapping)
    rows: list[LatentSet] = list(sets) if per_row else [sets]  # type: ignore[list-item]
    layers = sorted({int(layer_id) for s in rows for layer_id, ids in s.items() if len(ids)})
    plans: dict[int, LayerPlan] = {}
    for layer in layers:
        if layer not in saes:
            raise RefusalScopeError(f"no SAE for layer {layer}; SAEs are loaded for layers {sorted(saes)}")
        sae = saes[layer]
        row_ids = [torch.as_tensor(list(s.get(layer, ())), dtype=torch.long) for s in rows]
        for ids in row_ids:
            sae.check_latents(ids)
        union = torch.unique(torch.cat(row_ids)) if row_ids else torch.empty(0, dtype=torch.long)
        mask = None
        if per_row:
            mask = torch.zeros(len(rows), len(union), dtype=sae.W_dec.dtype)
            for r, ids in enumerate(row_ids):
                if len(ids):
                    mask[r, torch.searchsorted(union, ids)] = 1.0
            mask = mask.to(sae.W_dec.device)
        union = union.to(sae.W_dec.device)
        plans[layer] = LayerPlan(sae, union, mask, _restrict(sae, union))
    return plans, per_row


def plan_membership(saes: Mapping[int, Sae], candidates: Sequence[tuple[int, int]],
                    member: torch.Tensor) -> dict[int, LayerPlan]:
    """Per-row plans from a (B, n) boolean matrix over ``candidates`` (row b ablates the candidates it marks).

    Same result as ``plan_sets`` with one set per row, without per-row Python work: Stage 2 scores thousands
    of nested sets of one candidate list this way.
    """
    layers = torch.tensor([layer_id for layer_id, _ in candidates], dtype=torch.long)
    latents = torch.tensor([i for _, i in candidates], dtype=torch.long)
    plans: dict[int, LayerPlan] = {}
    for layer in sorted(set(layers.tolist())):
        if layer not in saes:
            raise RefusalScopeError(f"no SAE for layer {layer}; SAEs are loaded for layers {sorted(saes)}")
        sae = saes[layer]
        cols = torch.nonzero(layers == layer).flatten()
        ids, inverse = torch.unique(latents[cols], return_inverse=True)
        sae.check_latents(ids)
        mask = torch.zeros(member.shape[0], len(ids), dtype=sae.W_dec.dtype, device=member.device)
        mask.index_add_(1, inverse.to(member.device), member[:, cols.to(member.device)].to(mask.dtype))
        mask = mask.clamp_(max=1).to(sae.W_dec.device)
        ids = ids.to(sae.W_dec.device)
        plans[layer] = LayerPlan(sae, ids, mask, _restrict(sae, ids))
    return plans


def _positions(h: torch.Tensor, positions) -> torch.Tensor | None:
    """Index of the positions to edit, or None for all of them; an empty tensor means "none in this forward".

    Offsets count from the end of the prompt; during cached generation (one new token per forward) a
    position-restricted edit does nothing. "first" is each row's first real token (needs the batch's mask).
    """
    if positions is None:
        return None
    T = h.shape[1]
    if T == 1:
        return torch.empty(0, dtype=torch.long)
    if positions == "first":
        mask = current_attention_mask()
        if mask is None:
            raise RefusalScopeError("position 'first' needs the batch's attention mask; run the forward through "
                                    "refusalscope.lm.inference (or hooks.batch_context)")
        return mask.int().argmax(dim=1).to(h.device)[:, None]  # (B, 1): per-row position
    idx = torch.as_tensor(list(positions), dtype=torch.long)
    if (idx >= T).any() or (idx < -T).any():
        raise RefusalScopeError(f"positions {list(positions)} fall outside a sequence of {T} tokens")
    return (idx % T).to(h.device)


def _gather(h: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        return h
    if pos.dim() == 2:  # per-row positions
        return torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1]))
    return h[:, pos]


def _scatter(h: torch.Tensor, pos: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    if pos is None:
        return new
    out = h.clone()
    if pos.dim() == 2:
        out.scatter_(1, pos[..., None].expand(-1, -1, h.shape[-1]), new)
    else:
        out[:, pos] = new
    return out


def _row_mask(plan: LayerPlan, batch: int) -> torch.Tensor | None:
    if plan.mask is None:
        return None
    if plan.mask.shape[0] != batch:
        raise RefusalScopeError(f"the intervention carries {plan.mask.shape[0]} latent sets but the batch has "
                                f"{batch} rows; select(rows) it first")
    return plan.mask[:, None, :]


def ablation_delta(plan: LayerPlan, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """z_S W_dec[S] for each row's set S, (B, T, d) in float32."""
    x = x.float()
    if fast and plan.sub is not None:
        z = plan.sub.encode(x)  # (B, T, u): only the ablated latents
        dec = plan.sub.W_dec
    else:
        z = plan.sae.encode(x).index_select(-1, plan.ids)
        dec = plan.sae.W_dec.index_select(0, plan.ids)
    m = _row_mask(plan, x.shape[0])
    if m is not None:
        z = z * m
    return z @ dec


@dataclass(frozen=True)
class LatentAblation(Intervention):
    """Zero-ablate latent sets (error term kept) at resid_post of their layers; one set, or one per batch row."""

    plans: dict[int, LayerPlan]
    per_row: bool = False
    positions: tuple[int, ...] | str | None = None  # None: every position, generated tokens included
    fast: bool = True

    @classmethod
    def build(cls, saes: Mapping[int, Sae], sets: LatentSet | Sequence[LatentSet], *, positions=None,
              fast: bool = True) -> "LatentAblation":
        plans, per_row = plan_sets(saes, sets)
        return cls(plans, per_row, positions if positions in (None, "first") else tuple(positions), fast)

    @classmethod
    def from_membership(cls, saes: Mapping[int, Sae], candidates: Sequence[tuple[int, int]], member: torch.Tensor, *,
                        positions=None, fast: bool = True) -> "LatentAblation":
        """One set per row given as a (B, n) boolean matrix over ``candidates`` (see ``plan_membership``)."""
        return cls(plan_membership(saes, candidates, member), True,
                   positions if positions in (None, "first") else tuple(positions), fast)

    def select(self, rows):
        return replace(self, plans={layer: p.select(rows) for layer, p in self.plans.items()}) if self.per_row else self

    def hooks(self, n_layers: int) -> list[Hook]:
        def make(plan: LayerPlan):
            def edit(h: torch.Tensor):
                if plan.ids.numel() == 0:
                    return None
                pos = _positions(h, self.positions)
                if pos is not None and pos.numel() == 0:
                    return None
                x = _gather(h, pos)
                new = (x.float() - ablation_delta(plan, x, self.fast)).to(h.dtype)
                return _scatter(h, pos, new)
            return edit

        return [Hook("resid_post", layer, make(plan)) for layer, plan in sorted(self.plans.items())]


@dataclass(frozen=True)
class LatentClamp(Intervention):
    """Set latents to ``value`` at chosen positions, error term kept: h' = h + (v − z_S) W_dec[S].

    The paper's steering experiment clamps refusal features at <bos> (``positions="first"``) on benign prompts.
    """

    plans: dict[int, LayerPlan]
    value: float
    per_row: bool = False
    positions: tuple[int, ...] | str | None = "first"

    @classmethod
    def build(cls, saes: Mapping[int, Sae], sets: LatentSet | Sequence[LatentSet], value: float, *,
              positions="first") -> "LatentClamp":
        plans, per_row = plan_sets(saes, sets)
        return cls(plans, float(value), per_row, positions if positions in (None, "first") else tuple(positions))

    def select(self, rows):
        return replace(self, plans={layer: p.select(rows) for layer, p in self.plans.items()}) if self.per_row else self

    def hooks(self, n_layers: int) -> list[Hook]:
        def make(plan: LayerPlan):
            def edit(h: torch.Tensor):
                pos = _positions(h, self.positions)
                if plan.ids.numel() == 0 or (pos is not None and pos.numel() == 0):
                    return None
                x = _gather(h, pos).float()
                sae = plan.sae
                z = sae.encode(x).index_select(-1, plan.ids) if plan.sub is None else plan.sub.encode(x)
                change = self.value - z
                m = _row_mask(plan, x.shape[0])
                if m is not None:
                    change = change * m
                dec = sae.W_dec.index_select(0, plan.ids)
                return _scatter(h, pos, (x + change @ dec).to(h.dtype))
            return edit

        return [Hook("resid_post", layer, make(plan)) for layer, plan in sorted(self.plans.items())]


@dataclass(frozen=True)
class LatentRecorder(Intervention):
    """Record latent activations during any forward: all latents of a layer (``latents[l] = None``) or a set.

    Each forward appends one (B, P, n) float32 CPU tensor per layer to ``records[layer]``, P = recorded positions.
    Record hooks run after any edit on the same layer, so they see the edited stream when combined with ablations.
    """

    saes: Mapping[int, Sae]
    latents: Mapping[int, Sequence[int] | None]
    positions: tuple[int, ...] | str | None = None
    records: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def hooks(self, n_layers: int) -> list[Hook]:
        out = []
        for layer, ids in sorted(self.latents.items()):
            if layer not in self.saes:
                raise RefusalScopeError(f"no SAE for layer {layer}; SAEs are loaded for layers {sorted(self.saes)}")
            sae = self.saes[layer]
            idx = None
            if ids is not None:
                sae.check_latents(ids)
                idx = torch.as_tensor(list(ids), dtype=torch.long, device=sae.W_dec.device)
            self.records.setdefault(layer, [])

            def edit(h, layer=layer, sae=sae, idx=idx):
                pos = _positions(h, self.positions)
                if pos is not None and pos.numel() == 0:
                    return None
                x = _gather(h, pos).float()
                z = sae.encode(x) if idx is None else sae.encode_subset(x, idx)
                self.records[layer].append(z.cpu())
                return None
            out.append(Hook("resid_post", layer, edit))
        return out


def reference_ablate(sae: Sae, h: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
    """The paper's formula, literally: decode the masked code and add back the SAE error (one set, all positions)."""
    z = sae.encode(h.float())
    keep = torch.ones(sae.width, dtype=z.dtype, device=z.device)
    keep[list(latents)] = 0
    return sae.decode(z * keep) + (h.float() - sae.decode(z))
