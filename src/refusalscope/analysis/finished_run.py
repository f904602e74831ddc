"""A finished run, opened for analyses: what it holds (stages, per-prompt records, Stage-3 results), the features
it found, and a ``StageContext`` built from its own model, SAEs, judge and completion cache.

Analyses read the run through this class only, so the run-store contract they depend on is in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

from refusalscope.errors import RefusalScopeError
from refusalscope.judges import Judge, make_judge
from refusalscope.pipeline.records import PromptRecord
from refusalscope.saes.features import Feature
from refusalscope.store import RunStore

# what an analysis may need, and the command that makes it
_MAKES = {
    "stage1": "refusalscope run --stages 1,2",
    "stage2": "refusalscope run --stages 1,2",
    "stage3": "refusalscope interactions --run RUN",
    "hydra": "refusalscope analyze hydra --run RUN",
    "taxonomy": "refusalscope analyze taxonomy --run RUN",
    "explain": "refusalscope analyze explain --run RUN",
}


def explicit(settings, name: str):
    """An analysis' model option only when the user set it (else None: the run's own value, so cached completions
    match)."""
    return getattr(settings, name) if name in settings.model_fields_set else None


class FinishedRun:
    """Read access to a run directory written by ``refusalscope run`` (and ``interactions``, ``analyze``)."""

    def __init__(self, root: str | Path, *, judge: Judge | None = None):
        self.store = RunStore(root, create=False)
        if not self.store.exists("config.run.json") or not self.store.exists("summary.json"):
            raise RefusalScopeError(f"{self.store.root} is not a finished 'refusalscope run' "
                                    "(config.run.json and summary.json are missing)")
        self._judge = judge

    # ---- what the run holds ---------------------------------------------------------------------------------------

    @cached_property
    def config(self) -> dict:
        return self.store.resolve(self.store.read_json("config.run.json"))  # run:REL → under where the run lies

    @cached_property
    def summary(self) -> dict:
        return self.store.read_json("summary.json")

    def has(self, what: str) -> bool:
        if what in ("stage1", "stage2", "stage3"):
            return what in self.summary
        return self.store.exists(f"analyses/{what}/summary.json")

    def require(self, analysis: str, *what: str) -> None:
        """One error line naming the first missing prerequisite and the command that makes it."""
        for need in what:
            if not self.has(need):
                made_by = _MAKES.get(need, need).replace("RUN", str(self.store.root))
                raise RefusalScopeError(f"'analyze {analysis}' needs {need.replace('stage', 'Stage ')} results, "
                                        f"which {self.store.root} lacks; run '{made_by}' first")

    @cached_property
    def records(self) -> list[PromptRecord]:
        """Every finished prompt's record (Stages 1-2 and controls), by id."""
        out = []
        for p in sorted(self.store.path("prompts").glob("*.json")):
            rec = PromptRecord.from_json(json.loads(p.read_text()))
            if rec is not None:
                out.append(rec)
        return out

    @cached_property
    def stage3(self) -> dict:
        """Stage-3 results by prompt id (empty when the run has no Stage 3)."""
        from refusalscope.stages.stage3 import Stage3Result

        out = {}
        for p in sorted(self.store.path("stage3/prompts").glob("*.json")):
            res = Stage3Result.model_validate(json.loads(p.read_text()))
            out[res.id] = res
        return out

    def stage2_set(self, rec: PromptRecord) -> list[Feature]:
        """The prompt's chosen Stage-2 set (``Stage2Result.best``), empty when Stage 2 did not run."""
        return list(rec.stage2.best().features) if rec.stage2 is not None else []

    def stage3_set(self, prompt_id: int) -> list[Feature]:
        """The prompt's Stage-3 set: its active Stage-2 features plus the FM's top ``best_k`` new features (the
        set that jailbroke in the sweep); empty when Stage 3 found none."""
        res = self.stage3.get(prompt_id)
        if res is None or res.best_k is None:
            return []
        return sorted({*res.stage2_active, *res.fm_ranking[:res.best_k]})

    def pipeline_features(self) -> dict[Feature, list[str]]:
        """Every feature the run found, with the groups it was found in (stage1, stage2, stage3, hydra)."""
        groups: dict[Feature, set[str]] = {}
        for rec in self.records:
            for f in rec.stage1.features:
                groups.setdefault(f, set()).add("stage1")
            for f in self.stage2_set(rec):
                groups.setdefault(f, set()).add("stage2")
            for f in self.stage3_set(rec.id):
                if f not in self.stage2_set(rec):
                    groups.setdefault(f, set()).add("stage3")
        if self.store.exists("analyses/hydra/woken.parquet"):
            woken = self.store.read_table("analyses/hydra/woken.parquet")
            if "scope" in woken.columns:  # the sets' own dormant features; scope "all" may hold thousands of latents
                woken = woken[woken["scope"] == "set"]
            for text in woken.get("feature", []):
                groups.setdefault(Feature.parse(text), set()).add("hydra")
        return {f: sorted(g) for f, g in sorted(groups.items())}

    # ---- the model side -------------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> str | None:
        return self.config.get("data_dir") or self.store.resolve(self.store.read_json("run.json").get("data_dir"))

    def direction(self):
        """(r, metadata) of the run's refusal direction."""
        from refusalscope.direction import load_direction

        return load_direction(self.store)

    def context(self, *, device: str | None = None, dtype: str | None = None, judge: str | None = None,
                max_new_tokens: int | None = None, batch_size: int | None = None, layers: Sequence[int] | None = None):
        """A ``StageContext`` on the run's model, every SAE layer of the run (or ``layers``) held and placed as the
        run held and placed them (``--sae-dtype``, ``--sae-placement``), the run's judge and generation settings (or
        the given ones) and the run's completion cache, so a set generated by any stage or analysis is never
        generated again with the same settings."""
        from refusalscope.pipeline.steps import load_recorded_model
        from refusalscope.saes.placement import held_dtype, place_saes
        from refusalscope.saes.run_set import load_run_saes
        from refusalscope.stages.context import CompletionCache, StageContext

        cfg = self.config
        lm, _ = load_recorded_model(self.store, device=device, dtype=dtype)
        saes = load_run_saes(self.store, lm, layers)  # held as the run held them
        sae_dtype = held_dtype(saes)
        saes = place_saes(saes, lm.device, cfg.get("sae_placement") or "auto")
        return StageContext(lm, saes, self.judge(judge),
                            max_new_tokens=max_new_tokens or int(cfg.get("max_new_tokens", 48)),
                            batch_size=self.batch_size(batch_size, 1),
                            score_batch_size=cfg.get("stage2_batch_size"),
                            share_rows=bool(cfg.get("shared_rows", True)),
                            compile=self.compile_mode(lm, saes),
                            compile_scoring=cfg.get("compile_scoring", "off"),
                            sae_dtype=sae_dtype,
                            cache=CompletionCache(self.store.path("completions.sqlite")))

    def prompt_batch(self, setting: int | None = None) -> int:
        """Prompts an analysis runs together (``--prompt-batch``): the setting, else the run's, else the run's
        default (``pipeline.steps.DEFAULT_PROMPT_BATCH``)."""
        from refusalscope.pipeline.steps import DEFAULT_PROMPT_BATCH

        return int(setting or self.config.get("prompt_batch") or DEFAULT_PROMPT_BATCH)

    def batch_size(self, setting: int | None, prompt_batch: int) -> int:
        """Completions per generation batch for ``prompt_batch`` prompts together: the per-prompt batch size (the
        setting, else the run's) times the group, as ``refusalscope run`` sizes its batches."""
        return int(setting or self.config.get("batch_size", 16)) * prompt_batch

    def compile_mode(self, lm, saes: Mapping | None = None) -> str:
        """The run's compile mode on ``lm``'s device with ``saes``, "auto" decided as the run did (on its processed
        prompts), so an analysis finds the run's compiled or eager completions in the cache."""
        from refusalscope.lm.compiled import AUTO_MIN_PROMPTS, choose_mode, enough_prompts
        from refusalscope.pipeline.steps import prompts_per_process

        cfg = self.config
        n = prompts_per_process(int(self.summary.get("n_processed", 0)), cfg.get("ray"), cfg.get("ray_workers"))
        setting = enough_prompts(cfg.get("compile_generation", "off"), n,
                                 int(cfg.get("compile_min_prompts", AUTO_MIN_PROMPTS)))
        return choose_mode(setting, lm.device, saes)

    def judge(self, name: str | None = None) -> Judge:
        if self._judge is not None and name is None:
            return self._judge
        return make_judge(name or self.config.get("judge", "substring"))


def feature_table_rows(groups: Mapping[Feature, Sequence[str]]) -> list[dict]:
    return [{"feature": str(f), "layer": f.layer, "latent": f.latent, "groups": list(g)} for f, g in groups.items()]
