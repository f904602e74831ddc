"""Stage 1 (paper, "Stage 1: Refusal mediating features"): top-K latents per layer by cos(decoder row, r).

For K = step, 2·step, … up to a cap, the candidate set is the union over layers of each layer's top-K latents;
a prompt's Stage-1 set is the smallest such set whose ablation makes the generated completion a jailbreak
(judged; degenerate text is not a jailbreak). The K values of a prompt are generated as one batch per chunk,
stopping at the first chunk that holds a jailbreak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import time

import torch
from pydantic import BaseModel, Field

from refusalscope.saes.features import Feature, decoder_cosines
from refusalscope.saes.sae import Sae
from refusalscope.stages.context import Flow, StageContext


def ranked_latents(saes: Mapping[int, Sae], direction: torch.Tensor, cap: int) -> dict[int, list[int]]:
    """Per layer, the ``cap`` latents with the largest cos(W_dec[i], r), best first."""
    cos = decoder_cosines(saes, direction)
    return {layer: torch.argsort(c, descending=True)[:cap].tolist() for layer, c in sorted(cos.items())}


def candidate_set(ranked: Mapping[int, Sequence[int]], k: int) -> list[Feature]:
    """The union over layers of each layer's top-``k`` latents."""
    return sorted(Feature(layer, i) for layer, ids in ranked.items() for i in ids[:k])


def k_values(step: int, cap: int) -> list[int]:
    return list(range(step, cap + 1, step))


class Stage1Result(BaseModel):
    """One prompt's Stage 1: the smallest jailbreaking K and its set, and every K tried."""

    k: int | None  # smallest jailbreaking K; None if none up to the cap
    features: list[Feature]
    completion: str
    jailbroken: bool
    refused: bool
    degenerate: bool
    tried: list[dict] = Field(default_factory=list)  # every K evaluated: k, jailbroken, refused, degenerate, completion
    seconds: float = 0.0  # wall time of its Stage 1; run with other prompts (a lockstep), time shared with them

    @property
    def size(self) -> int:
        return len(self.features)


def stage1_flow(prompt: str, ranked: Mapping[int, Sequence[int]], *, step: int = 10, cap: int = 200,
                chunk: int = 5) -> Flow:
    """Stage 1 of one prompt as a flow (``StageContext.lockstep``): each chunk of K values is one request."""
    t0 = time.perf_counter()
    tried: list[dict] = []
    ks = k_values(step, cap)
    last = None
    for start in range(0, len(ks), chunk):
        group = ks[start:start + chunk]
        results = yield [(prompt, candidate_set(ranked, k)) for k in group]
        for k, res in zip(group, results):
            tried.append({"k": k, **res.verdict.as_dict(), "completion": res.completion})
        for k, res in zip(group, results):
            last = (k, res)
            if res.jailbroken:
                return Stage1Result(k=k, features=candidate_set(ranked, k), completion=res.completion,
                                    **res.verdict.as_dict(), tried=tried, seconds=round(time.perf_counter() - t0, 2))
    k, res = last  # type: ignore[misc]
    return Stage1Result(k=None, features=candidate_set(ranked, cap), completion=res.completion,
                        **res.verdict.as_dict(), tried=tried, seconds=round(time.perf_counter() - t0, 2))


def run_stage1(ctx: StageContext, prompt: str, ranked: Mapping[int, Sequence[int]], *, step: int = 10,
               cap: int = 200, chunk: int = 5) -> Stage1Result:
    """Ablate the union of the per-layer top-K latents for K = step, 2·step, … ≤ cap; stop at the first jailbreak.

    The K values of one chunk are generated as one batch (one row per K).
    """
    return ctx.lockstep([stage1_flow(prompt, ranked, step=step, cap=cap, chunk=chunk)])[0]
