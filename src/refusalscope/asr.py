"""Attack success rate of a run's model on a prompt set, with or without a direction intervention."""

from __future__ import annotations

import re
import time

import pandas as pd

from refusalscope.config import AsrSettings
from refusalscope.data import check_disjoint, drop_overlap, load_prompts
from refusalscope.direction import load_direction
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.inference import generate
from refusalscope.interventions import ActivationAddition, DirectionAblation, Intervention
from refusalscope.judges import make_judge, summarize
from refusalscope.lm.loading import LoadedModel
from refusalscope.store import RunStore


def interventions_for(kind: str, store: RunStore, coeff: float | None = None) -> list[Intervention]:
    if kind == "none":
        return []
    direction, meta = load_direction(store)
    if kind == "ablate-direction":
        return [DirectionAblation(direction)]
    if kind == "add-direction":
        return [ActivationAddition(direction, int(meta["layer"]), coeff=float(coeff or meta["norm"]))]
    raise RefusalScopeError(f"unknown intervention {kind!r}")


def seen_prompts(store: RunStore) -> list[str]:
    if not store.exists("prompts_used.json"):
        return []
    return [t for texts in store.read_json("prompts_used.json").values() for t in texts]


def run_asr(lm: LoadedModel, settings: AsrSettings, store: RunStore, data_dir: str | None = None) -> dict:
    """Generate, judge, save ``asr/<name>.parquet`` and ``.json``; return the summary."""
    prompts = load_prompts(settings.prompts, data_dir=settings.data_dir or data_dir, column=settings.column)
    seen = seen_prompts(store)
    dropped = 0
    if settings.overlap == "error":
        check_disjoint(seen, prompts.texts, what="evaluation")
    elif settings.overlap == "drop":
        prompts, dropped = drop_overlap(seen, prompts)
        if len(prompts) == 0:
            raise RefusalScopeError("every evaluation prompt was used to train or select the direction")
    prompts = prompts.head(settings.limit)
    t0 = time.time()
    completions = generate(lm, prompts.texts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                           interventions=interventions_for(settings.intervention, store, settings.coeff),
                           desc=f"generate ({settings.intervention})")
    judge = make_judge(settings.judge)
    verdicts = judge.judge(prompts.texts, completions)
    summary = {**summarize(verdicts), "intervention": settings.intervention, "prompts": prompts.source,
               "dropped_overlap": dropped, "judge": judge.name, "seconds": round(time.time() - t0, 1)}
    table = pd.DataFrame({"prompt": prompts.texts, "completion": completions,
                          "refused": [v.refused for v in verdicts], "degenerate": [v.degenerate for v in verdicts],
                          "jailbroken": [v.jailbroken for v in verdicts], "reason": [v.reason for v in verdicts]})
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{prompts.name}_{settings.intervention}_{len(prompts)}")
    store.write_table(f"asr/{name}.parquet", table)
    store.write_json(f"asr/{name}.json", summary)
    return summary
