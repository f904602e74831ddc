"""The SAE-training activation pass and the SAE quality report, with the template prefix run once per batch
(``lm.shared_prefix``, the default) against the plain left-padded forward (issue 13: the README's main job on a
fresh machine).

    python benchmarks/bench_shared_prefix.py --run runs/default --data-dir ../shared/data --prompts 512

Collects resid_post of ``--layers`` for the first ``--prompts`` prompts of the SAE training corpus both ways (same
chunks, batches and ``prefix_every`` as ``refusalscope sae train``), then runs the quality report on the run's
SAEs (or random TopK SAEs of ``--width`` without ``--run``) over the held-out prompts both ways. Reports seconds,
tokens through the model (padding included), how many float16 activations differ and by how much, and the largest
relative difference in the quality table (``--no-eval``: the activation pass only). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench_common import emit


def model_tokens(tokenizer, texts, prefix_len: int, batches, shared: bool) -> tuple[int, int]:
    """(token positions a forward computes over these batches, batches split at the prefix): padded rows, or, where
    ``split_on_prefix`` splits a batch (as ``collect`` does), the prefix once plus padded suffixes."""
    from refusalscope.lm.shared_prefix import split_on_prefix

    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    total = split = 0
    for rows in batches:
        longest = max(lengths[i] for i in rows)
        if shared and split_on_prefix(tokenizer, [texts[i] for i in rows], prefix_len) is not None:
            split += 1
            total += prefix_len + len(rows) * (longest - prefix_len)
        else:
            total += len(rows) * longest
    return total, split


def token_relative_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token (row), ||a - b|| / ||b||: the difference on the scale of the token's activation vector (an
    element-wise measure overstates it at near-zero elements)."""
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp(min=1e-12)


def main() -> None:
    from refusalscope.config import SaeTrainOptions
    from refusalscope.lm.inference import length_sorted_batches
    from refusalscope.lm.loading import load_model
    from refusalscope.lm.prompts import format_chat
    from refusalscope.saes.evals import evaluate_sae_set
    from refusalscope.saes.run_set import _prompts, eval_prompts, load_run_saes
    from refusalscope.saes.sae import Sae
    from refusalscope.lm.prompts import template_prefix_length
    from refusalscope.saes.training.activations import collect
    from refusalscope.store import RunStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a run with SAEs (its model and SAE set); else --model and random SAEs")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--prompts", type=int, default=512, help="corpus prompts collected each way")
    ap.add_argument("--layers", default="2-19")
    ap.add_argument("--width", type=int, default=4096, help="random SAEs' width (without --run)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-prompts", type=int, default=256)
    ap.add_argument("--no-eval", action="store_true", help="time the activation pass only")
    ap.add_argument("--json")
    args = ap.parse_args()
    opts = SaeTrainOptions()
    torch.manual_seed(0)
    if args.run:
        import json

        model = json.loads((Path(args.run) / "run.json").read_text()).get("model", args.model)
    else:
        model = args.model
    lm = load_model(model, device="cpu")
    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    held_out = set(_prompts(opts.eval_sets, args.data_dir))
    corpus = [t for t in _prompts(opts.corpus, args.data_dir) if t not in held_out][:args.prompts]
    texts = format_chat(lm.tokenizer, corpus)
    p = template_prefix_length(lm.tokenizer)
    out: dict = {"model": lm.name, "prompts": len(corpus), "layers": len(layers), "prefix_tokens": p,
                 "threads": torch.get_num_threads()}

    acts, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (False, True):
            t0 = time.perf_counter()
            acts[shared] = collect(lm, corpus, layers, Path(tmp) / str(shared), batch_size=args.batch_size,
                                   chunk_prompts=args.chunk_prompts, share_prefix=shared, progress=False)
            seconds[shared] = time.perf_counter() - t0
    chunks = range(0, len(texts), args.chunk_prompts)
    plain_batches = [list(range(s, min(c + args.chunk_prompts, len(texts), s + args.batch_size)))
                     for c in chunks for s in range(c, min(c + args.chunk_prompts, len(texts)), args.batch_size)]
    sorted_batches = [[c + r for r in rows] for c in chunks
                      for rows in length_sorted_batches(texts[c:c + args.chunk_prompts], lm.tokenizer,
                                                        args.batch_size)]
    shared_tokens, split = model_tokens(lm.tokenizer, texts, p, sorted_batches, True)
    same_shapes = all(acts[True][la].shape == acts[False][la].shape for la in layers)
    out.update({
        "collect_plain_s": round(seconds[False], 3), "collect_shared_s": round(seconds[True], 3),
        "collect_speedup": round(seconds[False] / seconds[True], 2),
        "model_tokens_plain": model_tokens(lm.tokenizer, texts, p, plain_batches, False)[0],
        "model_tokens_shared": shared_tokens, "batches": len(sorted_batches), "batches_split": split,
        "kept_tokens_per_layer": int(acts[True][layers[0]].shape[0]), "same_shapes": same_shapes,
    })
    if same_shapes:
        diff = [(acts[True][la].float() - acts[False][la].float()) for la in layers]
        out.update({
            "fp16_values_differing": float(sum(int((d != 0).sum()) for d in diff) / sum(d.numel() for d in diff)),
            "max_abs_diff": float(max(d.abs().max() for d in diff)),
        })
        rel = torch.cat([token_relative_errors(acts[True][la], acts[False][la]) for la in layers])
        out.update({"token_rel_error_max": float(rel.max()), "token_rel_error_mean": float(rel.mean())})
    if args.no_eval:
        emit(out, args.json)
        return

    if args.run:
        saes = load_run_saes(RunStore(Path(args.run)), lm, layers=layers)
    else:
        g = torch.Generator().manual_seed(0)
        saes = {}
        for la in layers:
            W_dec = torch.randn(args.width, lm.d_model, generator=g)
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            saes[la] = Sae("topk", W_dec.t().contiguous(), torch.zeros(args.width), W_dec, torch.zeros(lm.d_model),
                           la, k=min(64, args.width))
    prompts = eval_prompts(opts.eval_sets, opts.n_eval, args.data_dir)
    tables = {}
    for shared in (False, True):
        t0 = time.perf_counter()
        tables[shared] = evaluate_sae_set(lm, saes, prompts, batch_size=args.batch_size, share_prefix=shared,
                                          progress=False)
        seconds[shared] = time.perf_counter() - t0
    cols = ["fvu", "l0", "dead_frac", "ce_clean", "ce_increase"]
    a, b = tables[True][cols].to_numpy(), tables[False][cols].to_numpy()
    out.update({
        "eval_prompts": len(prompts), "eval_plain_s": round(seconds[False], 3),
        "eval_shared_s": round(seconds[True], 3), "eval_speedup": round(seconds[False] / seconds[True], 2),
        "eval_same_tokens": bool((tables[True]["tokens"] == tables[False]["tokens"]).all()),
        "eval_max_rel_diff": {c: float(abs(a[:, i] - b[:, i]).max() / max(abs(b[:, i]).max(), 1e-12))
                              for i, c in enumerate(cols)},
    })
    emit(out, args.json)


if __name__ == "__main__":
    main()
