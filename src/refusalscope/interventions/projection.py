"""Pure functions for directional interventions on the residual stream (Arditi et al., Sec. 2.4)."""

from __future__ import annotations

import torch


def unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction / ||direction||`` along the last axis; a zero vector is an error, not a NaN."""
    norm = direction.norm(dim=-1, keepdim=True)
    if torch.any(norm == 0):
        raise ValueError("cannot normalise a zero direction")
    return direction / norm


def like(direction: torch.Tensor):
    """``h -> direction`` on h's device and in h's dtype, converted once per (device, dtype): a hook called at every
    layer and decoding step then copies a CPU direction to the GPU once, not at each call (each blocking copy
    waits for the whole GPU stream)."""
    copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in copies:
            copies[key] = direction.to(device=h.device, dtype=h.dtype)
        return copies[key]

    return get


def _broadcast(direction: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # (d,) applies to every row; (B, d) gives each batch row its own direction.
    d = direction.to(dtype=h.dtype, device=h.device)
    return d if d.dim() == 1 else d.view(d.shape[0], *([1] * (h.dim() - 2)), d.shape[-1])


def project_out(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Directional ablation h' = h - (h . r̂) r̂ for a unit r̂ (per batch row when ``direction`` is (B, d))."""
    r = _broadcast(direction, h)
    return h - (h * r).sum(dim=-1, keepdim=True) * r


def add_direction(h: torch.Tensor, direction: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
    """Activation addition h' = h + λ r̂ (Arditi et al., Sec. 2.4), at every position."""
    r = _broadcast(direction, h)
    if isinstance(coeff, torch.Tensor) and coeff.dim() == 1:
        coeff = _broadcast(coeff.unsqueeze(-1), h)
    return h + coeff * r


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float().expand_as(a), dim=-1)
