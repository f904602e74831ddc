"""Stages 1-2 on a run's refused prompts in fp32 and in bf16 on the CPU: speed, and whether bf16 finds the same sets.

    # the acceptance run's 20 prompts (the lead runs this; about 2 × 20 × 1-2 min on 2 cores)
    python benchmarks/bf16_agreement.py --run RUN --n 20 --json bf16_agreement.json

For each dtype the run's model is loaded on the CPU in that dtype (the SAEs stay float32, as in every run), the
prompts are judged unablated, and each refused one goes through Stage 1 and, when Stage 1 jailbreaks, Stage 2,
with the run's settings (K step and cap, τ, seeds, block, tokens, judge) and a fresh in-memory completion cache
(so both dtypes generate everything). The prompts are the run's processed ones (prompts/<id>.json), else the
first N refused in baseline.parquet. Reports, per dtype, seconds for Stage 1 and Stage 2 and the jailbreak counts
(Stage 1, Stage 2 per τ), and between the dtypes: P("I") of the unablated prompt (max and mean |difference|,
same side of 0.5), Stage-1 K agreement, and per τ the Jaccard index of the Stage-2 sets (1 = identical; two empty
sets count as identical). Every count says which judge produced it. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench_common import emit

DTYPES = ("float32", "bfloat16")


def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def run_prompts(settings, store, prompts, dtype: str, judge, progress: bool = True) -> dict:
    """Baseline, Stage 1 and Stage 2 of every prompt in one dtype; per-prompt results and timings."""
    from tqdm.auto import tqdm

    from refusalscope.direction import load_direction
    from refusalscope.lm.inference import generate, map_last_logits
    from refusalscope.pipeline import steps
    from refusalscope.saes.run_set import load_run_saes
    from refusalscope.stages.context import CompletionCache, StageContext
    from refusalscope.stages.stage1 import ranked_latents, run_stage1
    from refusalscope.stages.stage2 import run_stage2

    lm = steps.load_run_model(settings.model_copy(update={"device": "cpu", "dtype": dtype}))
    saes = steps.stage_saes(load_run_saes(store, lm), settings, lm)
    direction, _ = load_direction(store)
    ranked = ranked_latents(saes, direction, settings.k_cap)
    ctx = StageContext(lm, saes, judge, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                       score_batch_size=settings.stage2_batch_size, cache=CompletionCache())
    ids = lm.refusal_token_ids()
    t0 = time.perf_counter()
    p_refusal = map_last_logits(lm, prompts, lambda x: torch.softmax(x, -1)[:, ids].sum(-1),
                                batch_size=settings.batch_size, progress=False).tolist()
    base = generate(lm, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                    progress=False)
    base_v = judge.judge(prompts, base)
    out = {"dtype": str(lm.dtype), "baseline_s": round(time.perf_counter() - t0, 2), "prompts": []}
    for prompt, p, v in tqdm(list(zip(prompts, p_refusal, base_v)), desc=f"stages 1-2 ({dtype})", unit="prompt",
                             disable=not progress, dynamic_ncols=True):
        row = {"prompt": prompt, "p_refusal": p, "baseline_refused": v.refused}
        t0 = time.perf_counter()
        r1 = run_stage1(ctx, prompt, ranked, step=settings.k_step, cap=settings.k_cap, chunk=settings.k_chunk)
        row.update(stage1_s=time.perf_counter() - t0, stage1_k=r1.k, stage1_jailbroken=r1.jailbroken)
        if r1.jailbroken:
            t0 = time.perf_counter()
            r2 = run_stage2(ctx, prompt, r1.features, taus=settings.tau, seeds=settings.seeds, block=settings.block)
            row.update(stage2_s=time.perf_counter() - t0, stage2_candidates=r2.candidates,
                       stage2={f"{t.tau:g}": {"features": [list(f) for f in t.features], "jailbroken": t.jailbroken}
                               for t in r2.per_tau})
        out["prompts"].append(row)
    return out


def compare(settings, runs: dict, judge_name: str) -> dict:
    a, b = runs["float32"]["prompts"], runs["bfloat16"]["prompts"]
    taus = [f"{t:g}" for t in settings.tau]
    summary: dict = {"judge": judge_name, "n_prompts": len(a)}
    for dtype, rows in (("float32", a), ("bfloat16", b)):
        s2 = [r for r in rows if "stage2" in r]
        summary[dtype] = {
            "baseline_refused": sum(r["baseline_refused"] for r in rows),
            "stage1_s": round(sum(r["stage1_s"] for r in rows), 2),
            "stage2_s": round(sum(r.get("stage2_s", 0.0) for r in rows), 2),
            "stage1_jailbroken": sum(r["stage1_jailbroken"] for r in rows),
            "stage2_jailbroken_per_tau": {t: sum(r["stage2"][t]["jailbroken"] for r in s2) for t in taus},
        }
        summary[dtype]["stages_1_2_s"] = round(summary[dtype]["stage1_s"] + summary[dtype]["stage2_s"], 2)
    diffs = [abs(x["p_refusal"] - y["p_refusal"]) for x, y in zip(a, b)]
    both = [(x, y) for x, y in zip(a, b) if "stage2" in x and "stage2" in y]
    summary["agreement"] = {
        "p_refusal_max_abs_diff": float(f"{max(diffs):.3g}") if diffs else None,
        "p_refusal_mean_abs_diff": float(f"{sum(diffs) / len(diffs):.3g}") if diffs else None,
        "p_refusal_same_side_of_half": sum((x["p_refusal"] > 0.5) == (y["p_refusal"] > 0.5) for x, y in zip(a, b)),
        "baseline_verdict_same": sum(x["baseline_refused"] == y["baseline_refused"] for x, y in zip(a, b)),
        "stage1_k_same": sum(x["stage1_k"] == y["stage1_k"] for x, y in zip(a, b)),
        "stage2_prompts_compared": len(both),
        "stage2_jaccard_mean_per_tau": {t: (round(sum(jaccard(x["stage2"][t]["features"], y["stage2"][t]["features"])
                                                      for x, y in both) / len(both), 3) if both else None)
                                        for t in taus},
        "stage2_identical_sets_per_tau": {t: sum(jaccard(x["stage2"][t]["features"], y["stage2"][t]["features"]) == 1
                                                 for x, y in both) for t in taus},
    }
    f32, b16 = summary["float32"], summary["bfloat16"]
    summary["agreement"]["same_jailbreak_counts"] = (
        f32["stage1_jailbroken"] == b16["stage1_jailbroken"]
        and f32["stage2_jailbroken_per_tau"] == b16["stage2_jailbroken_per_tau"])
    summary["speedup_bf16"] = round(f32["stages_1_2_s"] / b16["stages_1_2_s"], 2) if b16["stages_1_2_s"] else None
    return summary


def main(argv=None, judge=None) -> dict:
    from refusalscope.config import RunSettings
    from refusalscope.judges import make_judge
    from refusalscope.pipeline.records import PromptRecord
    from refusalscope.store import RunStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with finished Stages 1-2")
    ap.add_argument("--n", type=int, default=20, help="prompts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--details", action="store_true", help="include every prompt's results in the JSON")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = RunStore(args.run, create=False)
    cfg = store.read_json("config.run.json")
    cfg = store.resolve(cfg) if hasattr(store, "resolve") else cfg
    cfg["out"] = str(store.root)
    settings = RunSettings(**cfg)
    judge = judge or make_judge(settings.judge)
    names = sorted(p.name for p in store.path("prompts").glob("*.json")) if store.exists("prompts") else []
    prompts = [PromptRecord.from_json(store.read_json(f"prompts/{n}")) for n in names]
    texts = [r.prompt for r in prompts if r is not None][:args.n]
    if not texts:
        base = store.read_table("baseline.parquet")
        texts = base[base.refused.astype(bool)].prompt.tolist()[:args.n]
    runs = {dtype: run_prompts(settings, store, texts, dtype, judge) for dtype in DTYPES}
    out = {"run": str(store.root), "model": settings.model, "threads": torch.get_num_threads(),
           **compare(settings, runs, judge.name)}
    if args.details:
        out["details"] = runs
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
