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
    from refusalscope.stages.context import StageContext

# (R, n) boolean membership over the candidate list -> P(refusal) per row
ProbFn = Callable[[torch.Tensor], torch.Tensor]
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

    def best(self) -> TauResult:
        """The set later steps use: our choice, the smallest jailbreaking non-empty set (ties: the larger τ),
        else the largest set, so checks run on a set that does what Stage 2 claims whenever one exists."""
        winners = [r for r in self.per_tau if r.jailbroken and r.features]
        if winners:
            return min(winners, key=lambda r: (r.size, -r.tau))
        return max(self.per_tau, key=lambda r: r.size)


def run_stage2(ctx: StageContext, prompt: str, candidates: Sequence[Feature], *, taus: Sequence[float],
               seeds: Sequence[int], block: int = 5) -> Stage2Result:
    """Algorithm 1 on a prompt's Stage-1 set, every (τ, seed) from one batch of forwards (``prune_batched``);
    each τ keeps the features found with every seed and its set is judged by generation."""
    t0 = time.perf_counter()

    def prob(member: torch.Tensor) -> torch.Tensor:
        return ctx.refusal_probs(prompt, candidates, member)

    kept, chains = prune_batched(candidates, prob, taus, seeds, block)
    t1 = time.perf_counter()
    per_tau = [TauResult(tau=t, seed_sizes=[len(kept[(t, sd)]) for sd in seeds],
                         features=intersect([kept[(t, sd)] for sd in seeds])) for t in taus]
    for row, res in zip(per_tau, ctx.judged(prompt, [r.features for r in per_tau])):
        row.completion = res.completion
        row.jailbroken, row.refused, row.degenerate = (res.verdict.jailbroken, res.verdict.refused,
                                                       res.verdict.degenerate)
    return Stage2Result(candidates=len(candidates), per_tau=per_tau,
                        chains=[ChainRecord(seed=c.seed, blocks=c.blocks, probs=c.probs, deltas=c.deltas)
                                for c in chains],
                        seconds={"prune": round(t1 - t0, 2), "total": round(time.perf_counter() - t0, 2)})
