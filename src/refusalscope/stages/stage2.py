"""Stage 2 (paper, Algorithm 1 and Eq. 1): block-wise greedy pruning to a minimal faithful feature set.

    K ← ∅;  while |C \\ K| ≥ N:  V ← N random features of C \\ K
        Δ = |P(p, C\\K) − P(p, C\\(K∪V))| / P(p, C\\K)          (Eq. 1)
        if Δ ≥ τ: K ← K ∪ V   else: C ← C \\ V
    return K

Two implementations that must agree exactly:
- ``prune_sequential`` follows the pseudo-code line by line (two forwards per step);
- ``prune_batched`` uses that in both branches the ablated set C\\K loses exactly V, so the ablated sets form a
  chain C = S_0 ⊃ S_1 ⊃ … fixed by the seed's block order alone. All P(S_t) of a seed are one batch of forwards,
  and every τ is then a threshold on the same Δ_t: K(τ) = ∪ {V_t : Δ_t ≥ τ}.
Blocks are drawn with ``random.Random(seed).sample`` from the remaining pool in candidate order, identically in both.

``build_chains_skipping`` gives the same chains with fewer forwards: if no feature of block V_t fired (z > 0 at any
position) in the forward of S_{t-1}, where they are ablated, then ablating them or not changes nothing in that
forward (by induction over layers: the stream stays the same, so their z stays 0), so S_t = S_{t-1} \\ V_t has
exactly the forward of S_{t-1}: P(S_t) = P(S_{t-1}) and Δ_t = 0 without running it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, Field

from refusalscope.saes.features import Feature

if TYPE_CHECKING:
    from refusalscope.stages.context import Flow, StageContext

# (R, n) boolean membership over the candidate list -> P(refusal) per row
ProbFn = Callable[[torch.Tensor], torch.Tensor]
# the same, plus (R, n) bool: which of each row's ablated candidates fired (z > 0 somewhere) in the row's forward
FiredProbFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
EPS = 1e-12


def relative_change(p_before: float, p_after: float) -> float:
    """Eq. 1: |P(p, C\\K) − P(p, C\\(K∪V))| / P(p, C\\K) (0 when the base probability is 0)."""
    return abs(p_before - p_after) / p_before if p_before > EPS else 0.0


def prune_sequential(candidates: Sequence[Feature], prob: ProbFn, tau: float, seed: int,
                     block: int = 5) -> list[Feature]:
    """Algorithm 1 as written: the reference implementation."""
    rng = random.Random(seed)
    col = {f: j for j, f in enumerate(candidates)}
    C = list(candidates)
    K: list[Feature] = []
    while len([f for f in C if f not in K]) >= block:
        rest = [f for f in C if f not in K]
        V = rng.sample(rest, block)
        ablated = rest  # C \ K
        ablated_with_v = [f for f in rest if f not in V]  # C \ (K ∪ V)
        member = torch.zeros(2, len(candidates), dtype=torch.bool)
        member[0, [col[f] for f in ablated]] = True
        member[1, [col[f] for f in ablated_with_v]] = True
        p = prob(member)
        if relative_change(float(p[0]), float(p[1])) >= tau:
            K = K + V
        else:
            C = [f for f in C if f not in V]
    return sorted(K)


@dataclass
class Chain:
    """One seed's block order and P along the chain of ablated sets S_0 = C ⊃ S_1 ⊃ … ⊃ S_T."""

    seed: int
    blocks: list[list[Feature]]
    probs: list[float]  # P(S_0), …, P(S_T)

    @property
    def deltas(self) -> list[float]:
        return [relative_change(self.probs[t], self.probs[t + 1]) for t in range(len(self.blocks))]

    def kept(self, tau: float) -> list[Feature]:
        return sorted(f for V, d in zip(self.blocks, self.deltas) if d >= tau for f in V)


def block_order(candidates: Sequence[Feature], seed: int, block: int = 5) -> list[list[Feature]]:
    rng = random.Random(seed)
    pool = list(candidates)
    blocks = []
    while len(pool) >= block:
        V = rng.sample(pool, block)
        blocks.append(V)
        for f in V:  # order-preserving removal, as in the reference's list comprehension
            pool.remove(f)
    return blocks


def chain_sets(candidates: Sequence[Feature], blocks: Sequence[Sequence[Feature]]) -> list[list[Feature]]:
    sets, removed = [list(candidates)], set()
    for V in blocks:
        removed.update(V)
        sets.append([f for f in candidates if f not in removed])
    return sets


def chain_membership(candidates: Sequence[Feature], blocks: Sequence[Sequence[Feature]]) -> torch.Tensor:
    """Rows S_1 … S_T of a chain as a (T, n) boolean matrix: candidate j is in S_t until its block is drawn."""
    col = {f: j for j, f in enumerate(candidates)}
    removed_at = torch.full((len(candidates),), len(blocks) + 1, dtype=torch.long)
    for t, V in enumerate(blocks, start=1):
        removed_at[[col[f] for f in V]] = t
    steps = torch.arange(1, len(blocks) + 1)
    return removed_at[None, :] > steps[:, None]


def build_chains(candidates: Sequence[Feature], prob: ProbFn, seeds: Sequence[int], block: int = 5) -> list[Chain]:
    """Every seed's chain of P values from one batched call (S_0 = C is shared by all seeds)."""
    orders = {s: block_order(candidates, s, block) for s in seeds}
    rows = [torch.ones(1, len(candidates), dtype=torch.bool)]
    spans, n = {}, 1
    for s in seeds:
        m = chain_membership(candidates, orders[s])
        spans[s] = (n, n + m.shape[0])
        n += m.shape[0]
        rows.append(m)
    p = prob(torch.cat(rows)).tolist()
    return [Chain(s, orders[s], [p[0], *p[spans[s][0]:spans[s][1]]]) for s in seeds]


def build_chains_skipping(candidates: Sequence[Feature], prob: FiredProbFn, seeds: Sequence[int], block: int = 5,
                          batch_size: int = 64) -> tuple[list[Chain], dict[str, int]]:
    """``build_chains`` without the forwards of steps whose block did not fire in the previous set's forward
    (module docstring): the same chains, P(S_t) = P(S_{t-1}) exactly for those steps. Returns (chains,
    {"scored": sets run through the model, "skipped": steps copied}).

    Whether a step can be skipped is known only once the previous set's forward has run, so each round scores,
    for every seed, the first step that needs a forward plus the following steps predicted to need one from the
    last known firing pattern (up to ``batch_size`` sets per round); a step predicted skippable is checked
    against its real predecessor before it is copied, and scored in a later round when the check fails.
    """
    orders = {s: block_order(candidates, s, block) for s in seeds}
    n = len(candidates)
    col = {f: j for j, f in enumerate(candidates)}
    cols = {s: [torch.tensor([col[f] for f in V], dtype=torch.long) for V in orders[s]] for s in seeds}
    member = {s: chain_membership(candidates, orders[s]) for s in seeds}  # rows S_1 … S_T
    p0, f0 = prob(torch.ones(1, n, dtype=torch.bool))
    probs = {s: [float(p0[0])] + [None] * len(orders[s]) for s in seeds}
    fired = {s: [f0[0]] + [None] * len(orders[s]) for s in seeds}
    known = {s: 0 for s in seeds}  # steps 0..known[s] have P and firing pattern
    stats = {"scored": 1, "skipped": 0}

    def silent(s: int, t: int, pattern: torch.Tensor) -> bool:
        return not bool(pattern[cols[s][t - 1]].any())

    while True:
        for s in seeds:  # settle every step that is known now: scored, or its block silent in its predecessor
            T = len(orders[s])
            while known[s] < T:
                t = known[s] + 1
                if probs[s][t] is None:
                    if not silent(s, t, fired[s][t - 1]):
                        break
                    probs[s][t], fired[s][t] = probs[s][t - 1], fired[s][t - 1] & member[s][t - 1]
                    stats["skipped"] += 1
                known[s] = t
        open_seeds = [s for s in seeds if known[s] < len(orders[s])]
        if not open_seeds:
            break
        wanted: list[tuple[int, int]] = []  # (step, seed), every open seed's first step always included
        for s in open_seeds:
            last = fired[s][known[s]]
            wanted += [(t, s) for t in range(known[s] + 1, len(orders[s]) + 1)
                       if t == known[s] + 1 or (probs[s][t] is None and not silent(s, t, last))]
        firsts = [(known[s] + 1, s) for s in open_seeds]
        rest = sorted(w for w in wanted if w not in firsts)
        batch = firsts + rest[:max(0, batch_size - len(firsts))]
        p, f = prob(torch.stack([member[s][t - 1] for t, s in batch]))
        stats["scored"] += len(batch)
        for (t, s), pi, fi in zip(batch, p.tolist(), f):
            probs[s][t], fired[s][t] = pi, fi
    return [Chain(s, orders[s], probs[s]) for s in seeds], stats


def prune_batched(candidates: Sequence[Feature], prob: ProbFn, taus: Sequence[float], seeds: Sequence[int],
                  block: int = 5) -> tuple[dict[tuple[float, int], list[Feature]], list[Chain]]:
    """K for every (τ, seed), from one batch of forwards; returns ({(τ, seed): K}, chains)."""
    chains = build_chains(candidates, prob, seeds, block)
    return {(t, c.seed): c.kept(t) for t in taus for c in chains}, chains


def intersect(sets: Sequence[Sequence[Feature]]) -> list[Feature]:
    """Features found with every seed (paper: keep features found in all three runs)."""
    if not sets:
        return []
    common = set(sets[0])
    for s in sets[1:]:
        common &= set(s)
    return sorted(common)


class TauResult(BaseModel):
    """One τ of one prompt (a row of the paper's Table 1): the seed-intersected set and its judged completion."""

    tau: float
    seed_sizes: list[int]
    features: list[Feature]
    completion: str = ""
    jailbroken: bool = False
    refused: bool = True
    degenerate: bool = False

    @property
    def size(self) -> int:
        return len(self.features)


class ChainRecord(BaseModel):
    """A seed's Δ trace: the blocks in drawing order and P along the chain of ablated sets."""

    seed: int
    blocks: list[list[Feature]]
    probs: list[float]
    deltas: list[float]


class Stage2Result(BaseModel):
    """One prompt's Stage 2: every τ's pruned set, judged, and the Δ traces."""

    candidates: int
    per_tau: list[TauResult]
    chains: list[ChainRecord]
    seconds: dict[str, float] = Field(default_factory=dict)
    # sets run through the model; chain steps skipped; rows computed at the ablated layers (shared, one per set)
    scored: dict[str, int] = Field(default_factory=dict)

    def best(self) -> TauResult:
        """The set later steps use: our choice, the smallest jailbreaking non-empty set (ties: the larger τ),
        else the largest set, so checks run on a set that does what Stage 2 claims whenever one exists."""
        winners = [r for r in self.per_tau if r.jailbroken and r.features]
        if winners:
            return min(winners, key=lambda r: (r.size, -r.tau))
        return max(self.per_tau, key=lambda r: r.size)


def stage2_flow(ctx: StageContext, prompt: str, candidates: Sequence[Feature], *, taus: Sequence[float],
                seeds: Sequence[int], block: int = 5, skip_inactive: bool | None = None) -> Flow:
    """``run_stage2`` as a flow (``StageContext.lockstep``): the pruning forwards run in place, the τ sets'
    completions are one request."""
    t0 = time.perf_counter()
    scorer = ctx.scorer(prompt, candidates)
    skip = ctx.skips_inactive(scorer) if skip_inactive is None else skip_inactive
    if skip:
        chains, scored = build_chains_skipping(candidates, lambda m: scorer(m, fired=True), seeds, block,
                                               batch_size=ctx.scoring_batch)
        kept = {(t, c.seed): c.kept(t) for t in taus for c in chains}
    else:
        kept, chains = prune_batched(candidates, scorer, taus, seeds, block)
        scored = {"scored": scorer.rows_scored, "skipped": 0}
    # rows computed at the ablated layers, with shared rows and as one row per set would have (what sharing saved)
    scored.update(layer_rows=scorer.layer_rows[0], layer_rows_one_per_set=scorer.layer_rows[1])
    t1 = time.perf_counter()
    per_tau = [TauResult(tau=t, seed_sizes=[len(kept[(t, sd)]) for sd in seeds],
                         features=intersect([kept[(t, sd)] for sd in seeds])) for t in taus]
    t2 = time.perf_counter()
    judged = yield [(prompt, r.features) for r in per_tau]
    t3 = time.perf_counter()  # the time between t2 and t3 is shared with the other flows of a lockstep
    for row, res in zip(per_tau, judged):
        row.completion = res.completion
        row.jailbroken, row.refused, row.degenerate = (res.verdict.jailbroken, res.verdict.refused,
                                                       res.verdict.degenerate)
    return Stage2Result(candidates=len(candidates), per_tau=per_tau,
                        chains=[ChainRecord(seed=c.seed, blocks=c.blocks, probs=c.probs, deltas=c.deltas)
                                for c in chains],
                        seconds={"prune": round(t1 - t0, 2), "total": round(t2 - t0 + time.perf_counter() - t3, 2)},
                        scored=scored)


def run_stage2(ctx: StageContext, prompt: str, candidates: Sequence[Feature], *, taus: Sequence[float],
               seeds: Sequence[int], block: int = 5, skip_inactive: bool | None = None) -> Stage2Result:
    """Algorithm 1 on a prompt's Stage-1 set, every (τ, seed) from one batch of forwards (``prune_batched``), or
    without the steps whose block did not fire (``build_chains_skipping``; default: ``ctx.skips_inactive()``);
    each τ keeps the features found with every seed and its set is judged by generation."""
    return ctx.lockstep([stage2_flow(ctx, prompt, candidates, taus=taus, seeds=seeds, block=block,
                                     skip_inactive=skip_inactive)])[0]
