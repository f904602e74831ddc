"""Stages 1-2 and the Stage-2 checks of a run's first prompts, one prompt at a time and in lockstep groups.

    # CPU, the default model's finished run: 4 prompts alone, then in one group of 4
    python benchmarks/bench_prompt_batch.py --run runs/default --n 4 --groups 1,4
    # and once more with generations stopped when the judge decides (--early-stop)
    python benchmarks/bench_prompt_batch.py --run runs/default --n 4 --groups 4 --early-stop
    # and once more with compiled generation (--compile-generation inductor)
    python benchmarks/bench_prompt_batch.py --run runs/default --n 4 --groups 4 --compile-generation inductor

Each group size starts from an empty completion cache (nothing generated earlier is reused). Prints, per group
size, seconds per prompt (wall time of all prompts / n) and whether every record equals the one-at-a-time record
(``steps.process_prompts`` must give each prompt the record it gets alone; wall-clock fields ignored). One JSON
object last.
"""

from __future__ import annotations

import argparse
import time

from bench_common import emit


def main() -> None:
    import torch

    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.config import RunSettings
    from refusalscope.lm.compiled import MODES
    from refusalscope.pipeline import steps
    from refusalscope.pipeline.records import untimed, without
    from refusalscope.stages.context import CompletionCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished run (its model, SAEs, Stage-1 ranking, prompts)")
    ap.add_argument("--n", type=int, default=4, help="the run's first N processed prompts")
    ap.add_argument("--max-k", type=int, default=None, help="only prompts whose recorded Stage-1 K is at most this")
    ap.add_argument("--groups", default="1,4", help="group sizes to time (the first is the reference)")
    ap.add_argument("--early-stop", action="store_true", help="then the largest group once more with generations "
                    "stopped as soon as the judge decides (--early-stop): its time, and whether every verdict "
                    "equals the full-length run's (completions differ by design)")
    ap.add_argument("--compile-generation", choices=MODES, default="off",
                    help="then the largest group once more with compiled generation (refusalscope run "
                    "--compile-generation): its time, compiling included, and whether every record is the same")
    ap.add_argument("--shared-rows", choices=["on", "off"], default="on", help="scoring sets share rows "
                    "(refusalscope run --shared-rows; off: one row per set, the code before it)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    finished = FinishedRun(args.run)
    cfg = dict(finished.config)
    cfg["out"] = str(finished.store.root)
    settings = RunSettings(**{k: v for k, v in cfg.items() if k in RunSettings.model_fields})
    recs = [r for r in finished.records if args.max_k is None or (r.stage1.k or 10**9) <= args.max_k][:args.n]
    items = [(r.id, r.prompt) for r in recs]
    ranked = {int(k): v for k, v in finished.store.read_json("stage1_ranking.json").items()}
    base = finished.context()
    saes = steps.stage_saes(base.saes, settings, base.lm)
    out: dict = {"run": str(args.run), "threads": torch.get_num_threads(), "device": str(base.lm.device),
                 "dtype": str(base.lm.dtype), "prompts": [r.id for r in recs],
                 "recorded_stage1_k": [r.stage1.k for r in recs], "shared_rows": args.shared_rows, "by_group": {}}
    reference = None
    sizes = [int(x) for x in args.groups.split(",")]

    def run(g: int, early_stop: bool = False, compile: str = "off"):
        # the run's own context (steps.stage_context) with this group size and options, and an empty cache
        options = settings.model_copy(update={"prompt_batch": g, "shared_rows": args.shared_rows == "on",
                                              "early_stop": early_stop, "compile_generation": compile})
        ctx = steps.stage_context(base.lm, saes, base.judge, options, finished.store, CompletionCache())
        t0 = time.perf_counter()
        records = [rec for group in steps.groups(items, g) for rec in steps.process_prompts(ctx, group, ranked,
                                                                                              settings)]
        return [untimed(r.to_json()) for r in records], time.perf_counter() - t0

    for g in sizes:
        got, seconds = run(g)
        reference = reference or got
        out["by_group"][g] = {"seconds_per_prompt": round(seconds / len(items), 1),
                              "same_records_as_first": got == reference}
        print(f"group {g}: {seconds / len(items):.1f} s per prompt, same records: {got == reference}", flush=True)
    if args.early_stop:
        got, seconds = run(sizes[-1], early_stop=True)
        same = without(got, "completion") == without(reference, "completion")  # early stopping shortens them
        out["early_stop"] = {"group": sizes[-1], "seconds_per_prompt": round(seconds / len(items), 1),
                             "same_verdicts_as_first": same}
        print(f"group {sizes[-1]}, early stop: {seconds / len(items):.1f} s per prompt, same verdicts: {same}",
              flush=True)
    if args.compile_generation != "off":
        from torch._dynamo.utils import counters

        got, seconds = run(sizes[-1], compile=args.compile_generation)
        out["compiled"] = {"group": sizes[-1], "mode": args.compile_generation,
                           "seconds_per_prompt": round(seconds / len(items), 1),
                           "compiled_graphs": int(counters["stats"]["unique_graphs"]),
                           "same_records_as_first": got == reference}
        print(f"group {sizes[-1]}, compiled ({args.compile_generation}): {seconds / len(items):.1f} s per prompt "
              f"(compiling included), same records: {got == reference}", flush=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()
