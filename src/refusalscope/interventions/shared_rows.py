"""Many ablated sets of one prompt in one forward, where sets that still agree share a batch row.

Stage 2 scores nested sets of one prompt (a chain S_0 ⊃ S_1 ⊃ … per seed, paper Algorithm 1). Two sets give the same
residual stream up to layer l as long as they agree on the latents that fire (z ≠ 0) at layers ≤ l: a latent that
does not fire is subtracted as z W_dec = 0 whether it is ablated or not (by induction over layers, as in
``stage2.build_chains_skipping``). So the forward starts from the prompt alone (one row) and, at each ablated layer,
splits its rows only where the sets differ in a latent that fired in that row: a chain step costs a row only from
the layer where its block first fires.

``SharedRowAblation`` is the hook; ``rows`` maps each set to its row at the end of the forward. Same result as
``LatentAblation`` with one row per set (tested), up to float rounding that depends on batch shapes (a kernel
whose sums depend on the batch, as on a GPU or in bf16, can also move a latent across its threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.interventions.base import Intervention
from refusalscope.interventions.latents import LayerPlan, _codes
from refusalscope.lm.hooks import Hook


def split_rows(rows: torch.Tensor, member: torch.Tensor, fired: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """One layer's split of the shared rows.

    rows (R,): each set's row before the layer's ablation; member (R, u): the set's latents of this layer;
    fired (C, u): which latents are non-zero somewhere in each row. Returns (new rows (R,), parent (C',): the
    row each new row comes from, mask (C', u): what each new row ablates = the member latents that fired)."""
    effective = member & fired[rows]
    key = torch.cat([rows[:, None], effective.long()], dim=1)
    unique, new_rows = torch.unique(key, dim=0, return_inverse=True)
    return new_rows, unique[:, 0], unique[:, 1:].bool()


@dataclass
class SharedRowAblation(Intervention):
    """Zero-ablate one latent set per set-row (error term kept), computing each distinct stream once.

    The model is run on the prompt alone (batch 1); the hooks grow the batch as sets part ways. ``plans`` come
    from ``CandidatePlans.for_rows`` (a (R, u) mask per layer). After the forward, ``rows[r]`` is set r's row of
    the output; ``computed`` counts rows per ablated layer (what the sharing saved: R per layer without it).
    """

    plans: dict[int, LayerPlan]
    n_sets: int
    fast: bool = True
    # as in LatentAblation: per layer, (R, u) bool "the set's ablated latent fired (z > 0) in its forward"
    fired: dict[int, list[torch.Tensor]] | None = None
    rows: torch.Tensor = field(init=False)
    computed: list[int] = field(default_factory=list)

    def __post_init__(self):
        for layer, plan in self.plans.items():
            if plan.mask is None or plan.mask.shape[0] != self.n_sets:
                raise RefusalScopeError(f"layer {layer}: shared rows need one mask row per set ({self.n_sets})")
        self._start()

    def _start(self) -> None:
        """Every set in the one row of the prompt alone, before a forward."""
        self.rows = torch.zeros(self.n_sets, dtype=torch.long)
        self.n_rows = 1  # rows of the stream now (kept on the host: no device sync to read it)
        self.computed = []

    def hooks(self, n_layers: int) -> list[Hook]:
        self._start()

        def make(plan: LayerPlan, layer: int):
            member = plan.mask.bool()

            def edit(h: torch.Tensor):
                rows = self.rows.to(h.device)
                if h.shape[0] != self.n_rows:
                    raise RefusalScopeError(f"shared rows: the forward has {h.shape[0]} rows, expected "
                                            f"{self.n_rows}; run it on the prompt alone (batch 1)")
                self.computed.append(h.shape[0])
                z, dec = _codes(plan, h, self.fast)
                m = member.to(h.device)
                if self.fired is not None:
                    self.fired.setdefault(layer, []).append(m & (z > 0).any(dim=1)[rows])
                new_rows, parent, mask = split_rows(rows, m, (z != 0).any(dim=1))
                self.rows, self.n_rows = new_rows, parent.shape[0]
                x = h.index_select(0, parent).float()
                return (x - (z.index_select(0, parent) * mask[:, None, :].to(z.dtype)) @ dec).to(h.dtype)
            return edit

        return [Hook("resid_post", layer, make(plan, layer)) for layer, plan in sorted(self.plans.items())]
