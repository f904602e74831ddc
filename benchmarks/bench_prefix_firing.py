"""How many Stage-1 candidates fire inside the chat template's system prompt (whether Stage-2 sets could share its
key/value cache): per prompt and K, the candidates with z > 0 at a position of the first/system segments.

    python benchmarks/bench_prefix_firing.py --run runs/default --n 3 --k 10,30

Two ablated sets have the same system-prompt forward only if they agree on the candidates that fire there, so the
fewer fire, the more a cache of that prefix could be shared. Prints one line per prompt and K, one JSON object last.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.interventions import hooks_for
    from refusalscope.interventions.latents import LatentRecorder
    from refusalscope.lm.hooks import batch_context, hooked
    from refusalscope.lm.prompts import format_chat, tokenize
    from refusalscope.lm.segments import prompt_tokens
    from refusalscope.saes.features import as_latent_set
    from refusalscope.stages.stage1 import candidate_set

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=3, help="the run's first N processed prompts")
    ap.add_argument("--k", default="10,30", help="Stage-1 K values")
    args = ap.parse_args()

    run = FinishedRun(args.run)
    ranked = {int(k): v for k, v in run.store.read_json("stage1_ranking.json").items()}
    ctx = run.context(layers=list(ranked))
    lm = ctx.lm
    rows = []
    for rec in run.records[:args.n]:
        _, _, segments = prompt_tokens(lm.tokenizer, rec.prompt)
        prefix = sum(1 for s in segments if s in ("first", "system"))
        batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [rec.prompt]), lm.device)
        for k in (int(x) for x in args.k.split(",")):
            latents = as_latent_set(candidate_set(ranked, k))
            recorder = LatentRecorder(ctx.saes, latents)
            with torch.inference_mode(), hooked(lm.model, hooks_for([recorder], lm.n_layers)), \
                    batch_context(batch["attention_mask"]):
                lm.model(**batch, logits_to_keep=1, use_cache=False)
            firing = sum(int((recs[0][0][:prefix] > 0).any(0).sum()) for recs in recorder.records.values())
            row = {"id": rec.id, "tokens": len(segments), "system_prefix_tokens": prefix, "k": k,
                   "candidates": sum(len(v) for v in latents.values()), "firing_in_prefix": firing}
            rows.append(row)
            print(row, flush=True)
    print(json.dumps({"run": str(args.run), "rows": rows}))


if __name__ == "__main__":
    main()
