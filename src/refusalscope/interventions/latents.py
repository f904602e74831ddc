"""SAE latent interventions as hooks: ablate, clamp and record latents at one or more layers, exactly.

Ablation keeps the SAE error term (paper, "Sparse Autoencoders"):
    h' = W_dec (z ⊙ 1_{S'}) + b_dec + (h − W_dec z − b_dec) = h − z_S W_dec[S],
so only the ablated latents' activations z_S are needed. For JumpReLU/ReLU SAEs those cost d × |S| (the fast
path); TopK needs the full encode to know which latents made the top k. Ablating the empty set returns h itself.

Every layer's hook sits on that layer's resid_post, so ablations at several layers compose in one forward pass:
an upstream ablation changes the downstream latents that are then ablated (how dormant "hydra" features show).
A batch may carry one latent set per row: per layer we keep the union U of the rows' sets and a (B, |U|) mask.

SAEs may live on another device than the model (host memory, when a whole SAE set does not fit the GPU): plans
then move only the encoder/decoder columns of the latents they touch to the model's device, and full encodes
(``LatentRecorder`` of every latent, TopK) bring one layer's encoder over at a time (``encoder_on``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.compiled import bucket, persistent
from refusalscope.lm.hooks import Hook, current_attention_mask
from refusalscope.interventions.base import Intervention
from refusalscope.saes.sae import Sae, moved

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


def restrict(sae: Sae, ids: torch.Tensor, device: torch.device | None = None) -> Sae | None:
    """The latents ``ids`` of an independent-latent SAE as a narrow SAE (its encode is the fast path), on
    ``device`` (default: the SAE's): only these columns are copied there, as float32 (a host-held SAE may be
    held in bfloat16)."""
    if not sae.independent:
        return None
    ids = ids.to(sae.W_enc.device)
    thr = None if sae.threshold is None else sae.threshold[ids]
    sub = replace(sae, W_enc=sae.W_enc[:, ids].contiguous(), b_enc=sae.b_enc[ids],
                  W_dec=sae.W_dec[ids].contiguous(), threshold=thr)
    return sub.to(sae.W_enc.device if device is None else device, torch.float32)  # no copy when already so


def encoder_on(sae: Sae, device: torch.device) -> Sae:
    """``sae`` with its encoder on ``device`` in float32 (the SAE itself when it is ready there already). The
    decoder is not copied: the copy can encode, not decode (its W_dec is a zero-stride placeholder of the right
    shape)."""
    device = torch.device(device)
    if sae.ready_on(device):
        return sae
    mv = lambda t: moved(t, device, torch.float32)  # noqa: E731
    placeholder = torch.zeros((), dtype=torch.float32, device=device).expand(sae.width, sae.d_in)
    return replace(sae, W_enc=mv(sae.W_enc), b_enc=mv(sae.b_enc), b_dec=mv(sae.b_dec), threshold=mv(sae.threshold),
                   W_dec=placeholder)


def plan_sets(saes: Mapping[int, Sae], sets: LatentSet | Sequence[LatentSet],
              device: torch.device | None = None) -> tuple[dict[int, LayerPlan], bool]:
    """Per-layer plans for one set shared by all rows (a mapping) or one set per row (a sequence of mappings);
    ``device``: where the forward runs (default: each SAE's device)."""
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
        dev = sae.W_dec.device if device is None else torch.device(device)
        if per_row:
            mask = torch.zeros(len(rows), len(union), dtype=torch.float32)
            for r, ids in enumerate(row_ids):
                if len(ids):
                    mask[r, torch.searchsorted(union, ids)] = 1.0
            mask = mask.to(dev)
        plans[layer] = LayerPlan(sae, union.to(dev), mask, restrict(sae, union, dev))
    return plans, per_row


@dataclass(frozen=True)
class CandidatePlans:
    """The per-layer plans of one candidate list, without row masks: built once (the SAE columns of the
    candidates are sliced and moved once), then ``for_rows(member)`` adds the masks of each batch of sets."""

    plans: dict[int, LayerPlan]
    columns: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (candidate columns, index into plan.ids)
    n: int

    @classmethod
    def build(cls, saes: Mapping[int, Sae], candidates: Sequence[tuple[int, int]],
              device: torch.device | None = None) -> "CandidatePlans":
        layers = torch.tensor([layer_id for layer_id, _ in candidates], dtype=torch.long)
        latents = torch.tensor([i for _, i in candidates], dtype=torch.long)
        plans: dict[int, LayerPlan] = {}
        columns = {}
        for layer in sorted(set(layers.tolist())):
            if layer not in saes:
                raise RefusalScopeError(f"no SAE for layer {layer}; SAEs are loaded for layers {sorted(saes)}")
            sae = saes[layer]
            cols = torch.nonzero(layers == layer).flatten()
            ids, inverse = torch.unique(latents[cols], return_inverse=True)
            sae.check_latents(ids)
            dev = sae.W_dec.device if device is None else torch.device(device)
            plans[layer] = LayerPlan(sae, ids.to(dev), None, restrict(sae, ids, dev))
            columns[layer] = (cols, inverse)
        return cls(plans, columns, len(candidates))

    def for_rows(self, member: torch.Tensor) -> dict[int, LayerPlan]:
        """Plans for a (B, n) boolean matrix over the candidates (row b ablates the candidates it marks)."""
        out = {}
        for layer, plan in self.plans.items():
            cols, inverse = self.columns[layer]
            mask = torch.zeros(member.shape[0], len(plan.ids), dtype=torch.float32, device=member.device)
            mask.index_add_(1, inverse.to(member.device), member[:, cols.to(member.device)].to(mask.dtype))
            out[layer] = replace(plan, mask=mask.clamp_(max=1).to(plan.ids.device))
        return out

    def fired_columns(self, fired: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """(B, n) boolean over the candidates from per-layer (B, u) "fired" flags over each plan's ids."""
        rows = next(iter(fired.values())).shape[0] if fired else 0
        out = torch.zeros(rows, self.n, dtype=torch.bool)
        for layer, f in fired.items():
            cols, inverse = self.columns[layer]
            out[:, cols] = f.cpu()[:, inverse]
        return out


def plan_membership(saes: Mapping[int, Sae], candidates: Sequence[tuple[int, int]],
                    member: torch.Tensor, device: torch.device | None = None) -> dict[int, LayerPlan]:
    """Per-row plans from a (B, n) boolean matrix over ``candidates`` (row b ablates the candidates it marks).

    Same result as ``plan_sets`` with one set per row, without per-row Python work: Stage 2 scores thousands
    of nested sets of one candidate list this way.
    """
    return CandidatePlans.build(saes, candidates, device).for_rows(member)


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


def _codes(plan: LayerPlan, x: torch.Tensor, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(z of the plan's latents (B, T, u), their decoder rows (u, d)), float32 on x's device."""
    x = x.float()
    if fast and plan.sub is not None:
        return plan.sub.encode(x), plan.sub.W_dec  # only the plan's latents
    sae = plan.sae
    ids = plan.ids.to(sae.W_enc.device)
    z = encoder_on(sae, x.device).encode_subset(x, ids.to(x.device))
    if plan.sub is not None:
        return z, plan.sub.W_dec
    # a host-held SAE's columns come over as float32 (no copy for an SAE ready on x's device)
    return z, moved(sae.W_dec.index_select(0, ids), x.device, torch.float32)


def ablated_codes(plan: LayerPlan, x: torch.Tensor, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_S, W_dec[S]): each row's ablated activations (B, T, u), zero outside the row's set, and their decoder
    rows (u, d), in float32 on x's device."""
    z, dec = _codes(plan, x, fast)
    m = _row_mask(plan, x.shape[0])
    if m is not None:
        z = z * m
    return z, dec


def ablation_delta(plan: LayerPlan, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """z_S W_dec[S] for each row's set S, (B, T, d) in float32."""
    z, dec = ablated_codes(plan, x, fast)
    return z @ dec


@dataclass(frozen=True)
class LatentAblation(Intervention):
    """Zero-ablate latent sets (error term kept) at resid_post of their layers; one set, or one per batch row."""

    plans: dict[int, LayerPlan]
    per_row: bool = False
    positions: tuple[int, ...] | str | None = None  # None: every position, generated tokens included
    fast: bool = True
    # when given: per layer, one (B, u) bool tensor per forward, "the row's ablated latent fired (z > 0) at some
    # edited position" (Stage 2 skips chain steps whose block never fired)
    fired: dict[int, list[torch.Tensor]] | None = None
    # hooks read the plans' tensors from the process's persistent buffers (``lm.compiled.persistent``), set by
    # ``padded``: a compiled decode step then reads them at the same addresses on every call (so one pinned
    # ablation per forward: building another's hooks refills the same buffers)
    pinned: bool = False

    @classmethod
    def build(cls, saes: Mapping[int, Sae], sets: LatentSet | Sequence[LatentSet], *, positions=None,
              fast: bool = True, device: torch.device | None = None) -> "LatentAblation":
        plans, per_row = plan_sets(saes, sets, device)
        return cls(plans, per_row, positions if positions in (None, "first") else tuple(positions), fast)

    @classmethod
    def from_membership(cls, saes: Mapping[int, Sae], candidates: Sequence[tuple[int, int]], member: torch.Tensor, *,
                        positions=None, fast: bool = True, device: torch.device | None = None) -> "LatentAblation":
        """One set per row given as a (B, n) boolean matrix over ``candidates`` (see ``plan_membership``)."""
        return cls(plan_membership(saes, candidates, member, device), True,
                   positions if positions in (None, "first") else tuple(positions), fast)

    def select(self, rows):
        return replace(self, plans={layer: p.select(rows) for layer, p in self.plans.items()}) if self.per_row else self

    def padded(self, saes: Mapping[int, Sae], rows: int, device: torch.device | None = None) -> "LatentAblation":
        """The same ablation with shapes that depend on a bucket only, for compiled generation (``lm.compiled``):
        a plan at every layer of ``saes`` and every plan's latents padded to one power-of-two count U ≥ 8, the
        padding masked out of every row, and the hooks' tensors pinned (``pinned``). The same h' up to float32
        rounding (the wider matmuls may sum in another order; masked columns add zeros, and a layer with nothing
        to ablate gives h back unless h holds inf/NaN), while the compiled decode step sees the same hooks, shapes
        and addresses for many sets. Not for Stage 2's ``fired`` flags, which index the unpadded plans.

        ``rows``: the rows of a per-row ablation (needed when no row ablates anything)."""
        widths = [len(p.ids) for p in self.plans.values()]
        U = bucket(max(widths, default=0), least=8)  # our choice: ≥ 8, so small sets share one shape
        plans = {}
        for layer in sorted(set(saes) | set(self.plans)):
            plan = self.plans.get(layer)
            sae = plan.sae if plan is not None else saes[layer]
            dev = plan.ids.device if plan is not None else torch.device(device or sae.W_dec.device)
            ids = plan.ids if plan is not None else torch.empty(0, dtype=torch.long, device=dev)
            fill = ids[:1] if len(ids) else torch.zeros(1, dtype=torch.long, device=dev)
            full = torch.cat([ids, fill.expand(U - len(ids))])
            mask = torch.zeros(rows, U, dtype=torch.float32, device=dev)
            if plan is not None:
                mask[:, :len(ids)] = 1.0 if plan.mask is None else plan.mask
            plans[layer] = LayerPlan(sae, full, mask, restrict(sae, full, dev))
        return replace(self, plans=plans, per_row=True, pinned=True)

    def hook_plans(self) -> dict[int, LayerPlan]:
        """The plans the hooks read: ``plans``, or with ``pinned`` their tensors copied into persistent buffers."""
        if not self.pinned:
            return self.plans
        out = {}
        for layer, plan in self.plans.items():
            key = ("latent_ablation", layer)
            sub = plan.sub
            if sub is not None:
                sub = replace(sub, **{name: persistent((*key, name), getattr(sub, name))
                                      for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
                                      if getattr(sub, name) is not None})
            out[layer] = replace(plan, ids=persistent((*key, "ids"), plan.ids), sub=sub,
                                 mask=None if plan.mask is None else persistent((*key, "mask"), plan.mask))
        return out

    def hooks(self, n_layers: int) -> list[Hook]:
        def make(plan: LayerPlan, layer: int):
            def edit(h: torch.Tensor):
                if plan.ids.numel() == 0:
                    return None
                pos = _positions(h, self.positions)
                if pos is not None and pos.numel() == 0:
                    return None
                x = _gather(h, pos)
                z, dec = ablated_codes(plan, x, self.fast)
                if self.fired is not None:
                    self.fired.setdefault(layer, []).append((z > 0).any(dim=1))
                new = (x.float() - z @ dec).to(h.dtype)
                return _scatter(h, pos, new)
            return edit

        return [Hook("resid_post", layer, make(plan, layer)) for layer, plan in sorted(self.hook_plans().items())]


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
              positions="first", device: torch.device | None = None) -> "LatentClamp":
        plans, per_row = plan_sets(saes, sets, device)
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
                z, dec = _codes(plan, x)
                change = self.value - z
                m = _row_mask(plan, x.shape[0])
                if m is not None:
                    change = change * m
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

            moved: dict[str, Sae | None] = {}  # an SAE held elsewhere (host memory): what is moved, once

            def edit(h, layer=layer, sae=sae, idx=idx, moved=moved):
                pos = _positions(h, self.positions)
                if pos is not None and pos.numel() == 0:
                    return None
                x = _gather(h, pos).float()
                if sae.ready_on(x.device):
                    z = sae.encode(x) if idx is None else sae.encode_subset(x, idx)
                elif idx is not None and sae.independent:
                    if "sub" not in moved:
                        moved["sub"] = restrict(sae, idx, x.device)
                    z = moved["sub"].encode(x)
                else:  # one layer's encoder at a time
                    z = encoder_on(sae, x.device).encode(x)
                    z = z if idx is None else z.index_select(-1, idx.to(x.device))
                self.records[layer].append(z.cpu())
                return None
            out.append(Hook("resid_post", layer, edit))
        return out


def reference_ablate(sae: Sae, h: torch.Tensor, latents: Sequence[int]) -> torch.Tensor:
    """The paper's formula, literally: decode the masked code and add back the SAE error (one set, all positions)."""
    sae = sae.on(h.device)
    z = sae.encode(h.float())
    keep = torch.ones(sae.width, dtype=z.dtype, device=z.device)
    keep[list(latents)] = 0
    return sae.decode(z * keep) + (h.float() - sae.decode(z))
