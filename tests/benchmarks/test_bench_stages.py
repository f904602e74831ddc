"""benchmarks/bench_stages.py at toy size on the CPU (gpu_checks.sh's Stage-2 modes run it on a GPU): every
variant it times keeps the batched sets, and the profile tables are written."""

import json

from helpers import load_benchmark


def test_stage2_benchmark_variants_keep_the_same_sets(tmp_path, monkeypatch, capsys):
    import torch._dynamo

    from torch._dynamo.utils import counters

    bench = load_benchmark(monkeypatch, "bench_stages")
    torch._dynamo.reset()
    counters.clear()  # reset() keeps dynamo's counters, which the benchmark reports
    profile = tmp_path / "profile.txt"
    monkeypatch.setattr("sys.argv", ["bench_stages.py", "--random-shape", "toy", "--width", "256", "--candidates",
                                     "60", "--tokens", "10", "--batch-size", "16", "--share", "layers",
                                     "--sequential-taus", "0.1", "--sequential-seeds", "0", "--rows-off",
                                     "--skip-inactive", "--compile-scoring", "aot_eager", "--profile", str(profile)])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["candidates"] == 60 and out["stage2_sets_scored"] == 1 + 3 * (60 // 5)
    for key in ("rows_off_same_sets", "skipping_same_sets", "compiled_same_sets", "compiled_rows_off_same_sets",
                "identical_to_batched"):
        assert out[key] is True, key
    assert out["stage2_compiled_s"] > 0 and out["stage2_compiled_rows_off_s"] > 0
    assert out["compiled_max_abs_p_diff"] < 1e-6 and out["rows_off_max_abs_p_diff"] < 1e-6
    # --share layers: no shared key/value cache, so the compiled layers really ran in both compiled variants
    assert out["rows_off_cached_prefix_tokens"] == 0 and out["cached_prefix_tokens"] == 0
    assert out["compiled_graphs"][0] >= 1 and out["compiled_graphs"][1] >= out["compiled_graphs"][0]
    assert 0 < out["profile_matmul_share"] < 1 and 0 < out["profile_compiled_matmul_share"] < 1
    for name in ("profile.txt", "profile.compiled.txt", "profile.compiled_rows_off.txt"):
        assert "Self CPU" in (tmp_path / name).read_text(), name
