"""Stage-2 sanity checks (paper, "Redundant Features" and the random control of Stage 2).

For a prompt's chosen Stage-2 set: which of its features are inactive on the unablated prompt, whether the set
still jailbreaks without them, and equal-size sets of random features that are active on the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import BaseModel, Field

from refusalscope.saes.features import Feature
from refusalscope.stages.context import Flow, StageContext


class ControlSet(BaseModel):
    features: list[Feature]
    completion: str
    jailbroken: bool
    refused: bool
    degenerate: bool


class ControlsResult(BaseModel):
    tau: float  # the τ of the set checked
    size: int
    jailbroken: bool
    n_inactive: int = 0
    inactive: list[Feature] = Field(default_factory=list)
    without_inactive: ControlSet | None = None  # the set minus its inactive features, when some are active
    random: list[ControlSet] = Field(default_factory=list)


def random_seed_for(seed: int, prompt_id: int) -> int:
    """Our choice: one independent stream per prompt, so a prompt's controls do not depend on which others ran."""
    return seed * 1_000_003 + prompt_id


def controls_flow(ctx: StageContext, prompt: str, features: Sequence[Feature], *, tau: float, jailbroken: bool,
                  n_random: int = 1, seed: int = 0, prompt_id: int = 0) -> Flow:
    """``run_controls`` as a flow (``StageContext.lockstep``): its control sets' completions are one request."""
    out = ControlsResult(tau=tau, size=len(features), jailbroken=jailbroken)
    if not features:
        return out
    acts = ctx.activations(prompt, features)
    out.inactive = [f for f in features if acts[f] <= 0]
    out.n_inactive = len(out.inactive)
    sets: list[list[Feature]] = []
    if out.inactive and len(out.inactive) < len(features):
        sets.append([f for f in features if f not in out.inactive])
    pool = sorted(ctx.activations(prompt))
    rng = random.Random(random_seed_for(seed, prompt_id))
    randoms = [sorted(rng.sample(pool, min(len(features), len(pool)))) for _ in range(n_random)]
    results = yield [(prompt, s) for s in sets + randoms]
    as_control = [ControlSet(features=s, completion=r.completion, **r.verdict.as_dict())
                  for s, r in zip(sets + randoms, results)]
    if sets:
        out.without_inactive = as_control[0]
    out.random = as_control[len(sets):]
    return out


def run_controls(ctx: StageContext, prompt: str, features: Sequence[Feature], *, tau: float, jailbroken: bool,
                 n_random: int = 1, seed: int = 0, prompt_id: int = 0) -> ControlsResult:
    """Inactive features of ``features`` on the unablated prompt, the set without them, and ``n_random`` random
    sets of the same size drawn from the features active on the prompt (all judged by generation)."""
    return ctx.lockstep([controls_flow(ctx, prompt, features, tau=tau, jailbroken=jailbroken, n_random=n_random,
                                       seed=seed, prompt_id=prompt_id)])[0]
