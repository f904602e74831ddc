"""Host memory and time of loading an SAE set held in float32 or bfloat16 (``--sae-dtype``, issue 13).

    # 8 layers of GemmaScope-65k-shaped SAEs (2304 x 65,536), written once to DIR in SAELens format (fp32)
    python benchmarks/bench_sae_holding.py --dir /tmp/sae_set --layers 8 --width 65536 --d 2304

Each dtype loads in a fresh process (``saes.registry.load_sae_set``: SAELens reads a layer in float32, then it is
held in the dtype): peak resident memory (VmHWM) above the process's after its imports, the bytes held, and
seconds. ``auto`` runs twice: with this machine's available memory, and told that just enough for bfloat16 holding
is available (its loading peak, less the float32 layer loaded when it decides; it must then hold bfloat16).
LlamaScope's 131k set on Llama-3.1-8B's 32 layers is 137 GB in float32, 69 GB held in bfloat16: these runs show
what the per-layer holding peaks at, on a set this machine holds.
Prints one JSON object (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_set(root: Path, layers: int, width: int, d: int) -> None:
    """Random JumpReLU SAEs (layers 0..layers-1) in SAELens format under ``root``, unless already there."""
    from refusalscope.saes.saelens_io import save_sae
    from refusalscope.saes.sae import Sae

    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        path = root / f"layer_{layer}"
        if (path / "cfg.json").is_file():
            continue
        W_dec = torch.randn(width, d, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        save_sae(Sae("jumprelu", W_dec.t().contiguous(), torch.zeros(width), W_dec, torch.zeros(d), layer,
                     threshold=torch.full((width,), 0.1)), path)


def peak_rss() -> int:
    """This process's peak resident bytes (Linux VmHWM: unlike ``ru_maxrss``, not inherited across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_once(root: Path, dtype: str, available: float | None) -> dict:
    """In this process: load the set held as ``dtype`` and report memory and time."""
    import sae_lens  # noqa: F401 (imported before the baseline: its import is not loading)

    from refusalscope.saes import placement
    from refusalscope.saes.registry import load_sae_set

    base = peak_rss()
    if available is not None:
        placement.available_memory = lambda: int(available)
    t0 = time.perf_counter()
    saes = load_sae_set(str(root), None, dtype)
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    held = sum(t.numel() * t.element_size() for s in saes.values()
               for t in (s.W_enc, s.W_dec, s.b_enc, s.b_dec, s.threshold) if t is not None)
    fp32 = placement.sae_bytes(saes)
    return {"dtype_setting": dtype, "held_dtype": str(next(iter(saes.values())).W_enc.dtype)[6:],
            "layers": len(saes), "float32_set_gb": fp32 / 1e9, "held_gb": held / 1e9,
            "peak_above_imports_gb": (peak - base) / 1e9, "one_float32_layer_gb": fp32 / len(saes) / 1e9,
            "seconds": seconds, "told_available_gb": None if available is None else available / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the random set is (or is written)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=65536)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--load", choices=["float32", "bfloat16", "auto"], help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--available", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        print(json.dumps(load_once(args.dir, args.load, args.available)))
        return
    t0 = time.perf_counter()
    write_set(args.dir, args.layers, args.width, args.d)
    out: dict = {"set": {"layers": args.layers, "width": args.width, "d": args.d, "write_s": time.perf_counter() - t0},
                 "runs": []}
    layer = (2 * args.width * args.d + 2 * args.width + args.d) * 4  # float32 bytes, as placement.sae_bytes
    just_bf16 = (args.layers - 1) * (layer // 2) + layer  # placement.choose_host_dtype's bfloat16 peak, less a layer
    for dtype, available in (("float32", None), ("bfloat16", None), ("auto", None), ("auto", just_bf16)):
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--load", dtype]
        if available is not None:
            cmd += ["--available", str(available)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{dtype} load failed: {res.stderr.strip().splitlines()[-1]}")
        out["runs"].append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out["runs"][-1]), file=sys.stderr)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
