"""Interventions as lists of hooks, so ablation, steering and SAE edits share one mechanism.

An intervention whose tensors have a batch axis carries one setting per batch row; ``select(rows)`` cuts it to
the rows of a batch, which is how the batching helpers in ``lm.inference`` give each prompt its own setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from refusalscope.lm.hooks import Hook


class Intervention:
    per_row: bool = False
    # applies one function of the activation to every token of every row (no per-row setting, no positions), so a
    # forward may run a prefix all rows share once (``lm.shared_prefix``) under it
    uniform: bool = False

    def hooks(self, n_layers: int) -> list[Hook]:
        raise NotImplementedError

    def select(self, rows: Sequence[int]) -> "Intervention":
        return self


def hooks_for(interventions: Sequence[Intervention], n_layers: int, rows: Sequence[int] | None = None) -> list[Hook]:
    if sum(bool(getattr(iv, "pinned", False)) for iv in interventions) > 1:
        # pinned hooks read per-layer buffers of the process (``lm.compiled.persistent``): a second one would refill
        # the first one's
        raise ValueError("at most one pinned (compiled-generation) intervention per forward")
    out: list[Hook] = []
    for iv in interventions:
        if rows is not None and iv.per_row:
            iv = iv.select(rows)
        out.extend(iv.hooks(n_layers))
    return out
