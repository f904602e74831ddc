"""Stage 1 (paper, "Stage 1: Refusal mediating features"): top-K latents per layer by cos(decoder row, r).

For K = step, 2·step, … up to a cap, the candidate set is the union over layers of each layer's top-K latents;
a prompt's Stage-1 set is the smallest such set whose ablation makes the generated completion a jailbreak
(judged; degenerate text is not a jailbreak). The K values of a prompt are generated as one batch per chunk,
stopping at the first chunk that holds a jailbreak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from refusalscope.saes.features import Feature, as_latent_set, decoder_cosines
from refusalscope.lm.inference import generate
from refusalscope.judges import Judge
from refusalscope.interventions.latents import LatentAblation
from refusalscope.lm.loading import LoadedModel
from refusalscope.saes.sae import Sae


def ranked_latents(saes: Mapping[int, Sae], direction: torch.Tensor, cap: int) -> dict[int, list[int]]:
    """Per layer, the ``cap`` latents with the largest cos(W_dec[i], r), best first."""
    cos = decoder_cosines(saes, direction)
    return {l: torch.argsort(c, descending=True)[:cap].tolist() for l, c in sorted(cos.items())}


def candidate_set(ranked: Mapping[int, Sequence[int]], k: int) -> list[Feature]:
    return sorted((l, i) for l, ids in ranked.items() for i in ids[:k])


def k_values(step: int, cap: int) -> list[int]:
    return list(range(step, cap + 1, step))


@dataclass
class Stage1Result:
    k: int | None  # smallest jailbreaking K; None if none up to the cap
    features: list[Feature]
    completion: str
    jailbroken: bool
    refused: bool
    degenerate: bool
    tried: list[dict] = field(default_factory=list)  # every K evaluated: k, jailbroken, refused, degenerate


def run_stage1(lm: LoadedModel, prompt: str, saes: Mapping[int, Sae], ranked: Mapping[int, Sequence[int]],
               judge: Judge, *, step: int = 10, cap: int = 200, chunk: int = 5, max_new_tokens: int = 48,
               batch_size: int = 16) -> Stage1Result:
    tried: list[dict] = []
    ks = k_values(step, cap)
    last = None
    for start in range(0, len(ks), chunk):
        group = ks[start:start + chunk]
        sets = [as_latent_set(candidate_set(ranked, k)) for k in group]
        outs = generate(lm, [prompt] * len(group), max_new_tokens=max_new_tokens, batch_size=batch_size,
                        interventions=[LatentAblation.build(saes, sets)], progress=False)
        verdicts = judge.judge([prompt] * len(group), outs)
        for k, out, v in zip(group, outs, verdicts):
            tried.append({"k": k, "jailbroken": v.jailbroken, "refused": v.refused, "degenerate": v.degenerate,
                          "completion": out})
        for k, out, v in zip(group, outs, verdicts):
            last = (k, out, v)
            if v.jailbroken:
                return Stage1Result(k, candidate_set(ranked, k), out, True, v.refused, v.degenerate, tried)
    k, out, v = last  # type: ignore[misc]
    return Stage1Result(None, candidate_set(ranked, cap), out, False, v.refused, v.degenerate, tried)
