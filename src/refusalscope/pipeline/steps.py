"""The steps of ``refusalscope run``, each a function that reads and writes the run store.

Every resumable step records the inputs its output depends on (``steps.json``) and, on a rerun, reuses the output
when they match, recomputes it when that loses nothing, or stops with one clear message when recomputing would
make finished results inconsistent (a new refusal direction or SAE set under finished prompts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import pandas as pd

from refusalscope import __version__
from refusalscope.analysis.controls import controls_flow
from refusalscope.config import DirectionSettings, RunSettings, SaeTrainSettings, parse_layers
from refusalscope.data import PromptSet, load_prompts, resolve_data_dir
from refusalscope.direction import load_direction, run_direction
from refusalscope.errors import RefusalScopeError
from refusalscope.judges import Judge, check_judge_name
from refusalscope.lm.compiled import choose_mode, enough_prompts
from refusalscope.lm.inference import generate
from refusalscope.lm.loading import LoadedModel, load_model, portable_source
from refusalscope.pipeline.records import PromptRecord
from refusalscope.saes.registry import DEFAULT_SAE_SET, SAE_SETS, load_sae_set
from refusalscope.saes.run_set import (neuronpedia_record, recorded_sae_dtype, record_sae_set, resolve_spec,
                                        run_sae_train, same_sae_set)
from refusalscope.saes.placement import place_saes
from refusalscope.saes.sae import Sae, check_against_model
from refusalscope.stages.context import CompletionCache, Flow, StageContext
from refusalscope.stages.stage1 import stage1_flow
from refusalscope.stages.stage2 import stage2_flow
from refusalscope.store import RunStore, digest

log = logging.getLogger("refusalscope")


# ---- input checks -------------------------------------------------------------------------------------------------


def preflight(settings: RunSettings) -> PromptSet:
    """Check every input that needs no model (run directory, prompts, judge, layer spec, SAE spec, TOML values)
    before anything is loaded or written: a bad input costs seconds and leaves the run directory untouched."""
    out = Path(settings.out).expanduser()
    data_dir = settings.data_dir
    if out.exists() and not out.is_dir():
        raise RefusalScopeError(f"--out {out} is a file, not a run directory")
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise RefusalScopeError(f"{run_file} is not valid JSON ({e}); use another --out") from None
        if run.get("model") != settings.model:
            raise RefusalScopeError(
                f"{out} was made with model {run.get('model')!r}, not {settings.model!r}; use another --out"
            )
        data_dir = data_dir or RunStore(out, create=False).resolve(run.get("data_dir"))
    if settings.data_dir:
        resolve_data_dir(settings.data_dir)  # raises when it does not exist
    check_judge_name(settings.judge)
    if settings.layers:
        parse_layers(settings.layers, 10_000)  # the syntax now; the range once the model is loaded
    if (
        settings.saes
        and settings.saes not in SAE_SETS
        and not settings.saes.startswith(("saelens:", "cache:", "run:"))
        and not Path(settings.saes).expanduser().is_dir()
    ):
        raise RefusalScopeError(
            f"unknown SAE set {settings.saes!r}: not a registry name ({', '.join(SAE_SETS)}), "
            "not saelens:RELEASE:ID and not a directory"
        )
    return load_prompts(settings.prompts, data_dir=data_dir, column=settings.column)


def recorded_inputs(store: RunStore, step: str) -> dict | None:
    return store.read_json("steps.json").get(step) if store.exists("steps.json") else None


def record_inputs(store: RunStore, step: str, inputs: dict) -> None:
    steps = store.read_json("steps.json") if store.exists("steps.json") else {}
    steps[step] = inputs
    store.write_json("steps.json", steps)


# ---- steps --------------------------------------------------------------------------------------------------------


def run_record(settings, lm: LoadedModel) -> dict:
    """run.json: the model a run was made with and how it was loaded (written by ``direction`` and ``run``)."""
    return {
        "model": settings.model,
        "source": portable_source(lm.source),
        "device": settings.device,
        "dtype": settings.dtype,
        "chat_template": settings.chat_template,
        "data_dir": settings.data_dir,
        "refusal_tokens": list(lm.refusal_tokens),
        "refusalscope": __version__,
    }


def init_run(store: RunStore, settings: RunSettings, lm: LoadedModel) -> dict:
    """Write run.json for a new run (an existing one was checked by ``preflight``)."""
    if store.exists("run.json"):
        return store.read_json("run.json")
    run = run_record(settings, lm)
    write_config(store, "run.json", run)
    return run


def write_config(store: RunStore, name: str, options) -> None:
    """Write options (a settings object or a dict) with every path inside the run directory relative to it
    (``RunStore.portable``): the run directory holds no path of its own location, so it can move."""
    dumped = options.model_dump(mode="json") if hasattr(options, "model_dump") else options
    store.write_json(name, store.portable(dumped))


def load_run_model(settings, device: str | None = None) -> LoadedModel:
    """The model of ``settings`` (``device`` replaces its device: a Ray worker uses the one it was given)."""
    return load_model(
        settings.model,
        device=device or settings.device,
        dtype=settings.dtype,
        chat_template=settings.chat_template,
        refusal_tokens=tuple(settings.refusal_tokens) if settings.refusal_tokens else None,
    )


def load_recorded_model(store: RunStore, *, device: str | None = None, dtype: str | None = None,
                        chat_template: str | None = None) -> tuple[LoadedModel, dict]:
    """(model, run.json) of a finished run: the model loaded as the run recorded it; ``device``, ``dtype`` and
    ``chat_template`` replace the recorded ones when given. What ``asr``, ``sae`` and the analyses load."""
    run = store.resolve(store.read_json("run.json"))  # paths inside the run: under where it now lies
    lm = load_model(
        run["model"],
        device=device or run.get("device", "auto"),
        dtype=dtype or run.get("dtype", "auto"),
        chat_template=chat_template or run.get("chat_template"),
        refusal_tokens=tuple(run.get("refusal_tokens") or ()) or None,
    )
    return lm, run


# our choice: direction and SAE-training options that change results by float rounding only; a run resumes under
# either value
ROUNDING_ONLY = {"share_prefix"}


def _explicit(options) -> dict:
    """The options a user set (flag, environment or TOML), as JSON values."""
    dumped = options.model_dump(mode="json")
    return {k: dumped[k] for k in sorted(options.model_fields_set)}


def ensure_direction(lm: LoadedModel, settings: RunSettings, store: RunStore) -> None:
    """Step: the refusal direction (``refusalscope direction``), computed once per run.

    Options set explicitly that differ from the ones it was computed with stop the run: a new direction would
    change every later result.
    """
    if store.exists("direction.json"):
        if store.exists("config.direction.json"):
            used = store.read_json("config.direction.json")
            changed = {k: v for k, v in _explicit(settings.direction).items()
                       if k in used and k not in ROUNDING_ONLY and used[k] != v}
            if changed:
                was = ", ".join(f"{k}={used[k]!r}" for k in changed)
                raise RefusalScopeError(
                    f"{store.root} holds a refusal direction computed with {was}; "
                    "use another --out for new direction options"
                )
        return
    log.warning("no refusal direction in %s yet: computing it (refusalscope direction)", store.root)
    ds = DirectionSettings(
        model=settings.model,
        out=settings.out,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        chat_template=settings.chat_template,
        **settings.direction.model_dump(),
    )
    write_config(store, "config.direction.json", ds)
    summary = run_direction(lm, ds, store)
    if summary.get("note"):
        log.warning("direction: %s", summary["note"])


def ensure_saes(lm: LoadedModel, settings: RunSettings, store: RunStore) -> dict[int, Sae] | None:
    """Step: the run's SAE set (``saes.json``): the one named, the model's registry set, or trained ones. Returns
    the set when this step loaded it (held as ``--sae-dtype`` says), so a large one is not loaded twice.

    A run keeps its SAE set: ``--saes`` naming another one, or SAE-training options that differ from the ones it
    was trained with, stop with one message (every finished result was found with the recorded set).
    """
    entry_alias = lm.entry.alias if lm.entry else None
    if store.exists("saes.json"):
        rec = store.read_json("saes.json")
        if settings.saes and not same_sae_set(store, settings.saes, rec.get("spec", "")):
            raise RefusalScopeError(
                f"{store.root} was made with the SAE set {rec.get('spec')!r}, not {settings.saes!r}; use another --out"
            )
        if rec.get("kind") == "trained" and isinstance(rec.get("config"), dict):
            changed = {k: v for k, v in _explicit(settings.sae_train).items()
                       if k not in ROUNDING_ONLY and rec["config"].get(k, v) != v}
            if changed:
                was = ", ".join(f"{k}={rec['config'][k]!r}" for k in changed)
                raise RefusalScopeError(
                    f"{store.root} holds SAEs trained with {was}; use another --out for new SAE-training options"
                )
        return None
    spec = settings.saes or DEFAULT_SAE_SET.get(entry_alias or "")
    if spec:
        layers = parse_layers(settings.layers, lm.n_layers) if settings.layers else None
        saes = load_sae_set(resolve_spec(store, spec), layers, settings.sae_dtype)
        check_against_model(saes, lm.n_layers, lm.d_model)
        record_sae_set(store, spec, sorted(saes), {"kind": "loaded", **neuronpedia_record(saes)})
        return saes
    log.warning("no SAEs known for %s: training them (refusalscope sae train)", settings.model)
    ts = SaeTrainSettings(
        run=settings.out,
        data_dir=settings.data_dir,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        **settings.sae_train.model_dump(),
    )
    write_config(store, "config.sae_train.json", ts)
    run_sae_train(lm, ts, store, settings.data_dir)
    return None


def resumed_sae_dtype(store: RunStore, settings: RunSettings) -> RunSettings:
    """``settings`` whose ``sae_dtype`` "auto" is replaced by the holding an earlier session of the run chose
    (``saes.run_set.recorded_sae_dtype``), so a resumed run, wherever it runs, holds its SAEs as its finished
    prompts had them."""
    if settings.sae_dtype != "auto":
        return settings
    return settings.model_copy(update={"sae_dtype": recorded_sae_dtype(store)})


def stage_layers(saes: Mapping[int, Sae], settings: RunSettings, n_layers: int) -> list[int]:
    """The SAE layers the stages use: --layers (default all) at or above --min-layer."""
    wanted = parse_layers(settings.layers, n_layers) if settings.layers else sorted(saes)
    layers = [layer for layer in wanted if layer >= settings.min_layer and layer in saes]
    if not layers:
        raise RefusalScopeError(f"no SAE layer ≥ {settings.min_layer} among {sorted(saes)}; check --layers/--min-layer")
    return layers


def stage_saes(all_saes: Mapping[int, Sae], settings: RunSettings, lm: LoadedModel) -> dict[int, Sae]:
    """The stages' SAEs (``stage_layers``): float32 on the model's device, or held in host memory when they would
    not fit the GPU (``--sae-placement``, ``saes.placement``)."""
    return layer_saes(all_saes, stage_layers(all_saes, settings, lm.n_layers), {}, settings, lm)


def layer_saes(all_saes: Mapping[int, Sae], layers: Sequence[int], placed: Mapping[int, Sae], settings: RunSettings,
               lm: LoadedModel) -> dict[int, Sae]:
    """The SAEs of ``layers``: those already placed (``placed``: the stages' set, for Stage 3's FM) as they are, the
    others placed now, so no layer is held twice on the GPU (10-13 GB at Gemma-2-2B/65k)."""
    new = place_saes({layer: all_saes[layer] for layer in layers if layer not in placed}, lm.device,
                     settings.sae_placement)
    return {layer: placed[layer] if layer in placed else new[layer] for layer in layers}


# our choice: 4 prompts together by default: 1.26x on the CPU (decoding reads every weight once per step, for 5 rows
# or 20; benchmarks/RESULTS.md), and a kill loses at most 4 prompts' work; a GPU gains more from larger groups
DEFAULT_PROMPT_BATCH = 4


def prompt_batch(settings: RunSettings, lm: LoadedModel) -> int:
    """Prompts whose stages run together (``settings.prompt_batch``)."""
    return settings.prompt_batch or DEFAULT_PROMPT_BATCH


def compile_setting(settings: RunSettings, n_prompts: int) -> str:
    """``--compile-generation`` for a run of ``n_prompts`` refused prompts: "auto" becomes "off" when a process gets
    too few of them to pay its compile back; otherwise it stays, and each process (a Ray worker too) decides by
    its own device in ``stage_context`` (``lm.compiled.choose_mode``)."""
    n = prompts_per_process(n_prompts, settings.ray, settings.ray_workers)
    return enough_prompts(settings.compile_generation, n, settings.compile_min_prompts)


def prompts_per_process(n_prompts: int, ray: str | None, workers: int | None) -> int:
    """The prompts one process generates for: all of them, or with ``--ray`` and ``--ray-workers N`` a share of N
    (our choice: without N, all of them, since the cluster's size is not known before it is reached)."""
    return -(-n_prompts // workers) if ray and workers else n_prompts


def groups(items: Sequence, size: int) -> list[list]:
    """``items`` in consecutive groups of ``size``."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def stage_context(lm: LoadedModel, saes: Mapping[int, Sae], judge: Judge, settings: RunSettings,
                  store: RunStore, cache: CompletionCache | None = None) -> StageContext:
    """The stages' ``StageContext`` (Stages 1-3, here and on Ray workers alike), with the run's completion cache
    (completions.sqlite, or ``cache``); a group of prompts generates in batches of ``batch_size`` rows per prompt."""
    return StageContext(
        lm,
        saes,
        judge,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size * prompt_batch(settings, lm),
        score_batch_size=settings.stage2_batch_size,
        cache=cache if cache is not None else CompletionCache(store.path("completions.sqlite")),
        skip_inactive={"on": True, "off": False}.get(settings.stage2_skip),
        share_rows=settings.shared_rows,
        early_stop=settings.early_stop,
        compile=choose_mode(settings.compile_generation, lm.device, saes),
        compile_scoring=settings.compile_scoring,
        sae_dtype=settings.sae_dtype,
    )


def baseline(
    lm: LoadedModel, prompts: Sequence[str], judge: Judge, settings: RunSettings, store: RunStore
) -> pd.DataFrame:
    """Step: every prompt's unablated completion and verdict; recomputed when the prompts, the judge, the token
    budget or the dtype change."""
    inputs = {
        "prompts": digest(list(prompts)),
        "judge": settings.judge,
        "max_new_tokens": settings.max_new_tokens,
        "dtype": str(lm.dtype),
    }
    if store.exists("baseline.parquet") and recorded_inputs(store, "baseline") == inputs:
        return store.read_table("baseline.parquet")
    if store.exists("baseline.parquet"):
        log.warning("the baseline's inputs (prompts, judge, max-new-tokens or dtype) changed: recomputing it")
    outs = generate(
        lm, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, desc="baseline"
    )
    verdicts = judge.judge(prompts, outs)
    table = pd.DataFrame(
        {
            "id": range(len(prompts)),
            "prompt": list(prompts),
            "completion": outs,
            **{k: [v.as_dict()[k] for v in verdicts] for k in ("refused", "jailbroken", "degenerate")},
        }
    )
    store.write_table("baseline.parquet", table)
    record_inputs(store, "baseline", inputs)
    return table


RECORD_FORMAT = 2  # bump when PromptRecord changes shape
STAGE_KEYS = (
    "stages",
    "layers",
    "min_layer",
    "k_step",
    "k_cap",
    "block",
    "tau",
    "seeds",
    "n_random",
    "max_new_tokens",
    "judge",
    "seed",
    "refusal_tokens",
)


def stage_key(settings: RunSettings) -> dict:
    """The options a finished prompt's results depend on: a rerun with other values recomputes the prompt."""
    key = {k: v for k, v in settings.model_dump(mode="json").items() if k in STAGE_KEYS and v is not None}
    key["stages"] = [x for x in settings.stages if x in ("1", "2")]  # Stage 3 has its own files and key
    key["record_format"] = RECORD_FORMAT  # files of an older layout are recomputed, not half-read
    if settings.early_stop:  # shorter completions in the records (only then, so older records stay valid)
        key["early_stop"] = True
    if settings.sae_dtype == "bfloat16":  # rounded SAE weights (only then, so older records stay valid)
        key["sae_dtype"] = "bfloat16"
    return key


def finished_record(store: RunStore, prompt_id: int, prompt: str, settings: dict) -> PromptRecord | None:
    """The prompt's saved record if it was made for this prompt with these settings."""
    name = PromptRecord.file_name(prompt_id)
    if not store.exists(name):
        return None
    rec = PromptRecord.from_json(store.read_json(name))
    if rec is None or rec.prompt != prompt or rec.settings != settings:
        return None
    return rec


def finished_records(store: RunStore, ids: Sequence[tuple[int, str]], settings: dict) -> list[PromptRecord]:
    """The saved records of every (id, prompt), by id; one that is missing stops the run (rerun to redo it)."""
    records = [finished_record(store, pid, prompt, settings) for pid, prompt in ids]
    lost = [pid for (pid, _), rec in zip(ids, records) if rec is None]
    if lost:
        raise RefusalScopeError(f"no finished record for prompt(s) {lost}; rerun the command to redo them")
    return sorted(records, key=lambda r: r.id)


def prompt_flow(
    ctx: StageContext, prompt_id: int, prompt: str, ranked: Mapping[int, Sequence[int]], settings: RunSettings
) -> Flow:
    """Stages 1 and 2 and the Stage-2 sanity checks for one prompt, as a flow (``StageContext.lockstep``)."""
    r1 = yield from stage1_flow(prompt, ranked, step=settings.k_step, cap=settings.k_cap, chunk=settings.k_chunk)
    rec = PromptRecord(id=prompt_id, prompt=prompt, settings=stage_key(settings), stage1=r1)
    if "2" not in settings.stages:
        return rec
    if not r1.jailbroken:
        rec.stage2_skipped = "stage 1 found no jailbreaking set up to the K cap"
        return rec
    rec.stage2 = yield from stage2_flow(ctx, prompt, r1.features, taus=settings.tau, seeds=settings.seeds,
                                        block=settings.block)
    chosen = rec.stage2.best()
    rec.controls = yield from controls_flow(
        ctx,
        prompt,
        chosen.features,
        tau=chosen.tau,
        jailbroken=chosen.jailbroken,
        n_random=settings.n_random,
        seed=settings.seed,
        prompt_id=prompt_id,
    )
    return rec


def process_prompts(
    ctx: StageContext, items: Sequence[tuple[int, str]], ranked: Mapping[int, Sequence[int]], settings: RunSettings
) -> list[PromptRecord]:
    """``prompt_flow`` for several (prompt id, prompt) items in lockstep: their completions share generation
    batches, and each record is the one its prompt gets alone (up to float rounding of batch shapes)."""
    return ctx.lockstep([prompt_flow(ctx, pid, prompt, ranked, settings) for pid, prompt in items])


def write_prompts(ctx: StageContext, store: RunStore, ranked: Mapping[int, Sequence[int]], settings: RunSettings,
                  group: Sequence[tuple[int, str]]) -> None:
    """One item of step 8, a group of (prompt id, prompt): ``process_prompts``, then a file per prompt
    (atomically)."""
    for rec in process_prompts(ctx, group, ranked, settings):
        store.write_json(rec.file_name(rec.id), rec.to_json())


def stage3_prompts(records: Sequence[PromptRecord]) -> list[PromptRecord]:
    """The prompts Stage 3 runs on: those whose Stage 2 ran (it needs their Stage-2 sets)."""
    return [r for r in records if r.stage2 is not None and r.stage2.best().features]


def run_stage3_step(
    lm: LoadedModel,
    all_saes: Mapping[int, Sae],
    stage_saes: Mapping[int, Sae],
    judge: Judge,
    records: Sequence[PromptRecord],
    settings: RunSettings,
    store: RunStore,
    cache,
    progress: bool = True,
    new_judge: Callable[[], Judge] | None = None,
) -> tuple[list, dict]:
    """Step: Stage 3 (``stages.stage3``) on every prompt with a Stage-2 set; resumable per prompt. With
    ``settings.ray``, the FM's activation chunks and the prompts are done by Ray workers (``new_judge`` makes each
    worker's judge)."""
    # imported here: Stage 3 pulls in scipy and scikit-learn, which Stages 1-2 never need
    from refusalscope.pipeline.distributed import run_items
    from refusalscope.pipeline.workers import ChunkWorker, Stage3Worker
    from refusalscope.stages.stage3 import fit_interaction_models, fm_layers

    opts = settings.stage3
    todo_records = stage3_prompts(records)
    if not todo_records:
        raise RefusalScopeError(
            "Stage 3 needs prompts with a Stage-2 set; none of the processed prompts has one "
            "(run stages 1,2 on more prompts)"
        )
    _, meta = load_direction(store)
    layers = fm_layers(all_saes, opts.first_layer, int(meta["layer"]))
    fm_saes = layer_saes(all_saes, layers, stage_saes, settings, lm)
    run = store.read_json("run.json")
    shard = dict(ray=settings.ray, workers=settings.ray_workers, device=settings.device, progress=progress)
    models = fit_interaction_models(
        lm,
        fm_saes,
        store,
        opts,
        stage2_features=[f for r in todo_records for f in r.stage2.best().features],
        sae_dtype=settings.sae_dtype,
        data_dir=settings.data_dir or store.resolve(run.get("data_dir")),
        batch_size=settings.batch_size,
        progress=progress,
        compute_chunks=(lambda chunks: run_items(chunks, ChunkWorker(settings, layers), desc="stage 3 activations",
                                                 unit="chunk", **shard)) if settings.ray else None,
    )
    ctx = stage_context(lm, {**fm_saes, **stage_saes}, judge, settings, store, cache)  # as a Ray worker's
    key = store.portable(
        {**stage_key(settings), "stage3": opts.model_dump(mode="json"), "models": models.report["inputs"]}
    )
    done = {rec.id for rec in todo_records if finished_stage3(store, rec, key) is not None}
    todo = [(rec.id, rec.prompt, list(rec.stage2.best().features), rec.stage2.best().tau)
            for rec in todo_records if rec.id not in done]
    run_items(groups(todo, prompt_batch(settings, lm)), Stage3Worker(settings, new_judge, layers, models, key),
              local=partial(write_stage3_prompts, ctx, store, models, opts, key), desc="stage 3", done=len(done),
              count=len, **shard)
    results = [finished_stage3(store, rec, key) for rec in todo_records]  # the files, as a rerun reads them
    lost = [rec.id for rec, res in zip(todo_records, results) if res is None]
    if lost:
        raise RefusalScopeError(f"Stage 3 wrote no result for prompt(s) {lost}; rerun the command to redo them")
    return results, models.report


def finished_stage3(store: RunStore, rec: PromptRecord, key: dict):
    """The prompt's saved Stage-3 result if it was made for this prompt with this key."""
    from refusalscope.stages.stage3 import Stage3Result

    name = Stage3Result.file_name(rec.id)
    if not store.exists(name):
        return None
    try:
        done = Stage3Result.model_validate(store.read_json(name))
    except Exception:  # an older layout: recomputed
        return None
    return done if done.settings == key and done.prompt == rec.prompt else None


def write_stage3_prompts(ctx: StageContext, store: RunStore, models, opts, key: dict,
                         group: Sequence[tuple[int, str, list, float]]) -> None:
    """One item of Stage 3, a group of (prompt id, prompt, its Stage-2 set, τ): ``run_stage3_many``, then a file
    per prompt (atomically)."""
    from refusalscope.stages.stage3 import Stage3Result, run_stage3_many

    for done in run_stage3_many(ctx, group, models, opts, key):
        store.write_json(Stage3Result.file_name(done.id), done.model_dump(mode="json"))
