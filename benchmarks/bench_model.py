"""Time model load (cold and cached), batched last-token forward and greedy generation on a model.

    python benchmarks/bench_model.py [--model qwen2.5-coder-0.5b-instruct] [--cold] [--data-dir ../shared/data]
        [--compile-generation inductor|aot_eager]

``--cold`` also times the first-ever load (PyPI download + GGUF conversion) into a throwaway cache directory.
``--compile-generation`` also times the same generation compiled (``lm.compiled``): a first call (compiles) and a
second (warm), and says whether the completions equal the eager ones.
Prints one JSON object; copy the numbers into benchmarks/RESULTS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    from refusalscope.data import load_prompts
    from refusalscope.lm.compiled import MODES
    from refusalscope.lm.inference import generate, map_last_logits
    from refusalscope.lm.loading import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--data-dir", default=os.environ.get("REFUSALSCOPE_DATA", "../shared/data"))
    ap.add_argument("--cold", action="store_true", help="also time download + conversion in a fresh cache")
    ap.add_argument("--n-forward", type=int, default=32)
    ap.add_argument("--n-generate", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile-generation", default="off", choices=MODES)
    args = ap.parse_args()

    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "model": args.model}
    if args.cold:
        saved = os.environ.get("REFUSALSCOPE_CACHE")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["REFUSALSCOPE_CACHE"] = tmp
            _, res["load_cold_s"] = timed(lambda: load_model(args.model))
        if saved is None:
            os.environ.pop("REFUSALSCOPE_CACHE")
        else:
            os.environ["REFUSALSCOPE_CACHE"] = saved
    lm, res["load_cached_s"] = timed(lambda: load_model(args.model))
    res["device"], res["dtype"] = str(lm.device), str(lm.dtype)
    prompts = load_prompts("advbench", data_dir=args.data_dir).texts
    fw = prompts[: args.n_forward]
    for bs in (16, 32):
        _, t = timed(lambda: map_last_logits(lm, fw, lambda x: x[:, :1], batch_size=bs, progress=False))
        res[f"forward_{len(fw)}_prompts_bs{bs}_s"] = round(t, 2)
    gen = prompts[: args.n_generate]
    outs, t = timed(lambda: generate(lm, gen, max_new_tokens=args.new_tokens, batch_size=len(gen), progress=False))
    n_tok = sum(len(lm.tokenizer.encode(o, add_special_tokens=False)) for o in outs)
    res.update(generate_s=round(t, 2), generated_tokens=n_tok, generate_tok_per_s=round(n_tok / t, 1),
               generate_batch=len(gen))
    if args.compile_generation != "off":
        for call in ("first", "warm"):
            got, t = timed(lambda: generate(lm, gen, max_new_tokens=args.new_tokens, batch_size=len(gen),
                                            progress=False, compile=args.compile_generation))
            res[f"generate_compiled_{call}_s"] = round(t, 2)
        res.update(compile_generation=args.compile_generation, compiled_same_completions=got == outs)
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
