"""One Stage-2 scoring batch (64 ablated sets of a prompt's Stage-1 candidates) on a run's model, per dtype, with and
without the output head's contiguous-input hook (``lm.loading.contiguous_head_input``).

    # CPU, the default model's finished run: the K = 10 candidates of its second processed prompt
    python benchmarks/bench_scoring_batch.py --run runs/default --k 10 --dtypes float32,bfloat16

Without the hook, transformers' ``logits_to_keep=1`` hands the head a strided slice and torch runs one
matrix-vector product per row against the vocabulary. Prints, per dtype and setting, the best of ``--repeats``
timed batches (after one warm-up) and whether P is identical with and without the hook. One JSON object last.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.stages.stage1 import candidate_set

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--nth", type=int, default=1, help="the run's nth processed prompt")
    ap.add_argument("--k", type=int, default=10, help="Stage-1 K of the candidate set")
    ap.add_argument("--sets", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    run = FinishedRun(args.run)
    ranked = {int(k): v for k, v in run.store.read_json("stage1_ranking.json").items()}
    prompt = run.records[args.nth].prompt
    candidates = candidate_set(ranked, args.k)
    member = torch.rand(args.sets, len(candidates), generator=torch.Generator().manual_seed(0)) < 0.5
    out: dict = {"run": str(args.run), "prompt": prompt, "candidates": len(candidates), "sets": args.sets,
                 "threads": torch.get_num_threads(), "by_dtype": {}}
    for dtype in args.dtypes.split(","):
        ctx = run.context(dtype=dtype, layers=[layer for layer in ranked])
        head = ctx.lm.model.get_output_embeddings()
        hooks = dict(head._forward_pre_hooks)
        scorer = ctx.scorer(prompt, candidates)
        res, probs = {}, {}
        for setting in ("contiguous_head", "strided_head"):
            head._forward_pre_hooks.clear()
            if setting == "contiguous_head":
                head._forward_pre_hooks.update(hooks)
            scorer(member)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                probs[setting] = scorer(member)
                times.append(time.perf_counter() - t0)
            res[setting] = round(min(times), 2)
        head._forward_pre_hooks.update(hooks)
        res["same_p"] = bool(torch.equal(probs["contiguous_head"], probs["strided_head"]))
        res["max_abs_p_diff"] = float((probs["contiguous_head"] - probs["strided_head"]).abs().max())
        out["by_dtype"][dtype] = res
        print(f"{dtype}: {res}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
