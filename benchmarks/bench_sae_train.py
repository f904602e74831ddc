"""Time the SAE-training path (one activation pass for all layers, then one TopK SAE per layer) on random
weights of a real shape, so it runs where the real weights cannot be copied (e.g. a lent GPU).

    python benchmarks/bench_sae_train.py --random-shape qwen2.5-0.5b --device cuda --layers 2-19

Defaults mirror ``refusalscope sae train`` on the default model: 2,260 prompts of ~45 tokens (~40k kept tokens
per layer), width 4096, k 64, 4 epochs, batch 1024. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_common import random_model, sync


def main() -> None:
    from refusalscope.lm.hooks import Hook, hooked
    from refusalscope.saes.training.topk import TrainConfig, train_topk

    ap = argparse.ArgumentParser()
    ap.add_argument("--random-shape", default="qwen2.5-0.5b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default="2-19")
    ap.add_argument("--prompts", type=int, default=2260)
    ap.add_argument("--tokens", type=int, default=45)
    ap.add_argument("--keep-tokens", type=int, default=40_000, help="tokens per layer kept for training")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, n_layers, d, vocab = random_model(args.random_shape, device)
    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    keep_per_batch = max(1, args.keep_tokens * args.batch // args.prompts)
    store = {layer: [] for layer in layers}

    def rec(layer):
        def edit(h):
            flat = h.reshape(-1, h.shape[-1])
            store[layer].append(flat[:keep_per_batch].to(torch.float16))
        return edit

    g = torch.Generator().manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), hooked(model, [Hook("resid_post", layer, rec(layer)) for layer in layers]):
        for _ in range(0, args.prompts, args.batch):
            ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=g).to(device)
            model(input_ids=ids, logits_to_keep=1, use_cache=False)
    sync(device)
    t_collect = time.perf_counter() - t0
    cfg = TrainConfig(width=args.width, k=args.k, epochs=args.epochs)
    per_layer = []
    t1 = time.perf_counter()
    for layer in layers:
        x = torch.cat(store.pop(layer)).float()
        t = time.perf_counter()
        _, log = train_topk(x, layer, cfg, device=device)
        sync(device)
        per_layer.append({"layer": layer, "seconds": round(time.perf_counter() - t, 2), "tokens": int(x.shape[0]),
                          "final_train_fvu": round(log["trace"][-1]["fvu"], 3)})
    t_train = time.perf_counter() - t1
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "shape": args.random_shape, "layers": args.layers, "prompts": args.prompts,
                      "tokens_per_prompt": args.tokens, "collect_s": round(t_collect, 2),
                      "train_s": round(t_train, 2), "total_s": round(t_collect + t_train, 2),
                      "per_layer": per_layer}))


if __name__ == "__main__":
    main()
