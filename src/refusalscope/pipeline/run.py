"""``refusalscope run``: the pipeline as a numbered list of steps. Each step is a function of ``steps`` (or a
stage module) that reads and writes the run store, so the same command resumes an interrupted run.

Layout of the run directory (all tables load with pandas):
- run.json, steps.json (the inputs of each resumable step), direction.*, saes.json (+ sae_eval.parquet): the
  earlier steps;
- baseline.parquet: every prompt's unablated completion and verdict;
- completions.sqlite: every completion generated under an ablated set (reused by later stages and analyses);
- prompts/<id>.json: one file per finished prompt (``records.PromptRecord``), written atomically: a rerun skips it;
  with ``--ray`` the prompts are shared out to Ray workers (``distributed``), which write the same files;
- stage1.parquet, stage2.parquet, stage2_chains.parquet, controls.parquet, stages.png, summary.json: rebuilt from
  the per-prompt files at the end of every run (``tables.write_results``).
"""

from __future__ import annotations

from functools import partial

from refusalscope.asr import seen_prompts
from refusalscope.config import InteractionSettings, RunSettings, Stage3Options, parse_layers
from refusalscope.data import check_disjoint, drop_overlap
from refusalscope.direction import load_direction
from refusalscope.errors import RefusalScopeError
from refusalscope.judges import make_judge
from refusalscope.pipeline import steps
from refusalscope.pipeline.distributed import release_workers, require_ray, run_items
from refusalscope.pipeline.tables import write_results, write_stage3_results
from refusalscope.saes.placement import held_dtype
from refusalscope.saes.run_set import load_run_saes
from refusalscope.stages.stage1 import ranked_latents
from refusalscope.pipeline.workers import PromptWorker
from refusalscope.store import RunStore


def run_pipeline(settings: RunSettings, progress: bool = True) -> dict:
    try:
        return _pipeline(settings, progress)
    finally:
        release_workers()  # Ray workers, kept from step to step, are ended with the run


def _pipeline(settings: RunSettings, progress: bool) -> dict:
    # 1. check every input that needs no model; nothing is loaded or written before this passes
    prompts = steps.preflight(settings)
    if settings.ray:
        require_ray()
    new_judge = partial(make_judge, settings.judge)  # Ray workers make their own judge with it
    judge = new_judge()
    # 2. the model and the run directory
    lm = steps.load_run_model(settings)
    if settings.layers:
        parse_layers(settings.layers, lm.n_layers)
    store = RunStore(settings.out)
    steps.init_run(store, settings, lm)
    # 3. the refusal direction and 4. the SAE set (each computed once per run)
    steps.ensure_direction(lm, settings, store)
    settings = steps.resumed_sae_dtype(store, settings)
    all_saes = steps.ensure_saes(lm, settings, store) or load_run_saes(store, lm, dtype=settings.sae_dtype)
    # what "auto" chose on this machine, recorded below: Ray workers, resumed runs and analyses hold the SAEs alike
    settings = settings.model_copy(update={"sae_dtype": held_dtype(all_saes)})
    saes = steps.stage_saes(all_saes, settings, lm)  # on the device, or held in host memory (too big)
    direction, _ = load_direction(store)
    steps.write_config(store, "config.run.json", settings)  # the options this run now uses
    # 5. the prompts: never those the direction or SAEs were trained or selected on
    seen = seen_prompts(store)
    if settings.overlap == "error":
        check_disjoint(seen, prompts.texts, what="stage")
    elif settings.overlap == "drop":
        prompts, _ = drop_overlap(seen, prompts)
    prompts = prompts.head(settings.limit)
    if len(prompts) == 0:
        raise RefusalScopeError("no prompts left (all were used to train the direction or SAEs)")
    # 6. baseline completions; the stages run on the prompts the model refuses
    base = steps.baseline(lm, prompts.texts, judge, settings, store)
    refused = base[base.refused.astype(bool)]
    n_refused = len(refused)
    if settings.max_refused:
        refused = refused.head(settings.max_refused)
    # compiled generation: "auto" counts the run's refused prompts once (a resumed run decides alike); each
    # process's device decides the rest
    settings = settings.model_copy(update={"compile_generation": steps.compile_setting(settings, len(refused))})
    # 7. Stage 1's ranking of every layer's latents by cos(W_dec, r)
    ranked = ranked_latents(saes, direction, settings.k_cap)
    store.write_json("stage1_ranking.json", {str(layer): ids for layer, ids in ranked.items()})
    # 8. Stages 1-2 and the Stage-2 checks, in groups of prompts run in lockstep (here, or on Ray workers); a
    # finished prompt is one file, never recomputed; the records are read back from the files
    ctx = steps.stage_context(lm, saes, judge, settings, store)
    key = steps.stage_key(settings)
    ids = [(int(pid), prompt) for pid, prompt in zip(refused.id, refused.prompt)]
    todo = [(pid, prompt) for pid, prompt in ids if steps.finished_record(store, pid, prompt, key) is None]
    run_items(
        steps.groups(todo, steps.prompt_batch(settings, lm)),
        PromptWorker(settings, new_judge, ranked),
        local=partial(steps.write_prompts, ctx, store, ranked, settings),
        count=len,
        ray=settings.ray,
        workers=settings.ray_workers,
        device=settings.device,
        desc="stages " + ",".join(settings.stages),
        done=len(ids) - len(todo),
        progress=progress,
    )
    records = steps.finished_records(store, ids, key)
    # 9. tables, figure and summary of Stages 1-2
    summary = write_results(store, records, len(prompts), n_refused, settings)
    # 10. Stage 3: the FM and probe (trained once), then ranked ablations per prompt, resumably
    if "3" in settings.stages:
        results, report = steps.run_stage3_step(
            lm, all_saes, saes, judge, records, settings, store, ctx.cache, progress, new_judge
        )
        alone = {r.id: r.stage2.best().jailbroken for r in records if r.stage2 is not None}
        summary = write_stage3_results(store, results, report, alone)
    return summary


def run_interactions(settings: InteractionSettings, progress: bool = True) -> dict:
    """``refusalscope interactions``: Stage 3 on a finished Stages 1-2 run, with the run's own settings (its
    finished steps and prompts are reused, not recomputed)."""
    store = RunStore(settings.run, create=False)
    if not store.exists("config.run.json") or not store.exists("summary.json"):
        raise RefusalScopeError(f"{store.root} has no finished 'refusalscope run' (config.run.json, summary.json)")
    if "stage2" not in store.read_json("summary.json"):
        raise RefusalScopeError(f"{store.root} has no Stage-2 results; run 'refusalscope run --stages 1,2' first")
    cfg = store.resolve(store.read_json("config.run.json"))  # paths inside the run: under where it now lies
    cfg["out"] = str(store.root)
    cfg["stages"] = sorted({*cfg.get("stages", ["1", "2"]), "3"})
    cfg["stage3"] = settings.model_dump(include=set(Stage3Options.model_fields))
    for key in ("device", "dtype", "batch_size", "prompt_batch", "compile_generation",
                "compile_min_prompts"):
        if key in settings.model_fields_set:
            cfg[key] = getattr(settings, key)
    cfg["ray"], cfg["ray_workers"] = settings.ray, settings.ray_workers  # Ray only when this command asks for it
    if settings.data_dir:
        cfg["data_dir"] = settings.data_dir
    return run_pipeline(RunSettings(**cfg), progress=progress)
