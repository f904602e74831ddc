"""What a Ray worker loads for each step that ``pipeline.distributed`` shards, and the function it then runs per
item: the same function the single-process loop runs (``steps.write_prompts``, ``steps.write_stage3_prompts``,
``interaction_data.write_chunk``), on the worker's own model, SAEs and judge, so the files it writes are the ones a
single process would write.

Each worker is a small picklable recipe (the run's settings and what the driver computed: Stage 1's ranking, the
trained FM); ``start`` runs once per worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from refusalscope.config import RunSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.judges import Judge
from refusalscope.pipeline import steps
from refusalscope.saes.run_set import load_run_saes
from refusalscope.store import RunStore


def _load(settings: RunSettings, device: str | None):
    """(settings on ``device``, model, run store, every SAE of the run) in a worker."""
    if device:
        settings = settings.model_copy(update={"device": device})
    lm = steps.load_run_model(settings)
    store = RunStore(settings.out, create=False)
    return settings, lm, store, load_run_saes(store, lm, dtype=settings.sae_dtype)


def _judge(new_judge: Callable[[], Judge] | None) -> Judge:
    if new_judge is None:
        raise RefusalScopeError("a Ray worker needs a way to make the run's judge")
    return new_judge()


@dataclass
class PromptWorker:
    """Step 8: Stages 1-2 and the Stage-2 checks of a group of prompts, item [(id, prompt), …] →
    prompts/<id>.json each."""

    settings: RunSettings
    new_judge: Callable[[], Judge]
    ranked: dict[int, list[int]]

    def start(self, device: str | None = None) -> Callable:
        settings, lm, store, all_saes = _load(self.settings, device)
        ctx = steps.stage_context(lm, steps.stage_saes(all_saes, settings, lm), _judge(self.new_judge), settings,
                                  store)
        return partial(steps.write_prompts, ctx, store, self.ranked, settings)


@dataclass
class Stage3Worker:
    """Stage 3 of a group of prompts, item [(id, prompt, Stage-2 set, τ), …] → stage3/prompts/<id>.json each."""

    settings: RunSettings
    new_judge: Callable[[], Judge] | None
    fm_layers: list[int]
    models: object  # stages.stage3.InteractionModels, trained by the driver
    key: dict

    def start(self, device: str | None = None) -> Callable:
        settings, lm, store, all_saes = _load(self.settings, device)
        placed = steps.stage_saes(all_saes, settings, lm)
        fm_saes = steps.layer_saes(all_saes, self.fm_layers, placed, settings, lm)
        ctx = steps.stage_context(lm, {**fm_saes, **placed}, _judge(self.new_judge), settings, store)
        return partial(steps.write_stage3_prompts, ctx, store, self.models, settings.stage3, self.key)


@dataclass
class ChunkWorker:
    """The FM dataset's activation pass, item (prompts, chunk file, metadata) → stage3/activations/chunk_*."""

    settings: RunSettings
    layers: list[int]

    def start(self, device: str | None = None) -> Callable:
        from refusalscope.stages.interaction_data import write_chunk

        settings, lm, store, all_saes = _load(self.settings, device)
        saes = steps.layer_saes(all_saes, self.layers, {}, settings, lm)  # placed as the driver places them
        return partial(write_chunk, lm, saes, store, n_positions=settings.stage3.n_positions,
                       batch_size=settings.batch_size)
