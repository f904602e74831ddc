"""benchmarks/bench_matmul_dtypes.py at toy size: a throughput per dtype, and float32 never warned about."""

import json

from helpers import load_benchmark


def test_matmul_benchmark_reports_each_dtype(monkeypatch, capsys):
    bench = load_benchmark(monkeypatch, "bench_matmul_dtypes")
    monkeypatch.setattr("sys.argv", ["bench_matmul_dtypes.py", "--shape", "32,16,24", "--dtypes", "float32,bfloat16",
                                     "--loops", "2", "--repeats", "1"])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["shape"] == [32, 16, 24] and out["float32_gflops"] > 0 and out["bfloat16_gflops"] > 0
    assert out["float32_warned"] is False
    # bf16 is warned about exactly when an x86 CPU lacks both bf16 flags
    assert out["bfloat16_warned"] == (out["x86_avx"] and not {"avx512_bf16", "amx_bf16"} & set(out["half_flags"]))
