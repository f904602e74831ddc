"""Time one forward with latent sets ablated, dense path vs fast path, at several batch sizes.

    # CPU: the default model with random JumpReLU SAEs of width 16k on layers 3..19
    python benchmarks/bench_latents.py --model qwen2.5-coder-0.5b-instruct --layers 3-19 --width 16384
    # GPU: Gemma-2-2B-shaped random weights (bf16), 65k JumpReLU SAEs on every layer >= 3
    python benchmarks/bench_latents.py --random-shape gemma-2-2b --layers 3-25 --width 65536 --device cuda

Each batch row gets its own random set of ``--set-size`` latents per layer (the later stages' workload), the
prompt is ``--tokens`` long. Also checks that both paths give the same logits. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from bench_common import emit, random_jumprelu_saes, random_model, sync


def main() -> None:
    from refusalscope.lm.hooks import hooked
    from refusalscope.interventions import hooks_for
    from refusalscope.interventions.latents import LatentAblation

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a refusalscope model spec (real weights)")
    ap.add_argument("--random-shape", default=None, help="gemma-2-2b or qwen2.5-0.5b: random weights of that shape")
    ap.add_argument("--layers", default="3-19")
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--set-size", type=int, default=20, help="latents ablated per layer per row")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", default="1,32,128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.model:
        from refusalscope.lm.loading import load_model

        lm = load_model(args.model, device=args.device)
        model, n_layers, d, vocab = lm.model, lm.n_layers, lm.d_model, lm.model.config.vocab_size
    else:
        model, n_layers, d, vocab = random_model(args.random_shape, device)
    lo, hi = args.layers.split("-")
    layers = list(range(int(lo), min(int(hi), n_layers - 1) + 1))
    saes = random_jumprelu_saes(layers, d, args.width, device)
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "layers": f"{layers[0]}-{layers[-1]}", "width": args.width,
           "set_size_per_layer": args.set_size, "tokens": args.tokens, "results": []}
    for B in [int(b) for b in args.batch.split(",")]:
        ids = torch.randint(0, vocab, (B, args.tokens), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        sets = [{layer: torch.randperm(args.width, generator=g)[:args.set_size].tolist() for layer in layers}
                for _ in range(B)]
        row = {"batch": B}
        logits = {}
        for name, fast in (("none", None), ("dense", False), ("fast", True)):
            ivs = [] if fast is None else [LatentAblation.build(saes, sets, fast=fast)]
            times = []
            for _ in range(args.repeats):
                sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode(), hooked(model, hooks_for(ivs, n_layers)):
                    lg = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1].float()
                sync(device)
                times.append(time.perf_counter() - t0)
            logits[name] = lg
            row[f"{name}_s"] = round(min(times), 4)
        row["max_abs_logit_diff_fast_vs_dense"] = float((logits["fast"] - logits["dense"]).abs().max())
        row["speedup_fast_vs_dense"] = round(row["dense_s"] / row["fast_s"], 2)
        out["results"].append(row)
        print(json.dumps(row), flush=True)
    emit(out)


if __name__ == "__main__":
    main()
