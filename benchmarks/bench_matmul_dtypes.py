"""Matrix-product throughput per dtype on this CPU, and the flags that say whether it has bf16/fp16 instructions
(``lm.loading.slow_half_precision_warning`` warns from the same flags).

    python benchmarks/bench_matmul_dtypes.py            # 2048 x 896 by 896 x 4864: one MLP product of the default model

Prints one JSON object: GFLOP/s per dtype (best of ``--repeats`` timed loops) and the half-precision flags found.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import emit


def gflops(m: int, k: int, n: int, dtype: torch.dtype, loops: int, repeats: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            a @ b
        best = min(best, (time.perf_counter() - t0) / loops)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    from refusalscope.lm.loading import _HALF_FLAGS, cpu_flags, slow_half_precision_warning

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2048,896,4864", help="m,k,n of an (m, k) by (k, n) product")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    m, k, n = (int(x) for x in args.shape.split(","))
    flags = cpu_flags()
    out: dict = {"threads": torch.get_num_threads(), "shape": [m, k, n],
                 "half_flags": sorted((flags or set()) & {f for fs in _HALF_FLAGS.values() for f in fs}),
                 "x86_avx": any(f.startswith("avx") for f in flags or ()),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        out[f"{name}_gflops"] = round(gflops(m, k, n, dtype, args.loops, args.repeats), 2)
        out[f"{name}_warned"] = slow_half_precision_warning(dtype, torch.device("cpu"), flags) is not None
    emit(out, args.json)


if __name__ == "__main__":
    main()
