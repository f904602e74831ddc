"""benchmarks/bench_direction_prefix.py on a tiny model: both ways time every part of the direction step and choose
the same candidate, with scores equal up to rounding."""

import json

from helpers import load_benchmark


def test_direction_prefix_benchmark_agrees(monkeypatch, capsys, tiny_dirs, tiny_data_dir):
    bench = load_benchmark(monkeypatch, "bench_direction_prefix")
    monkeypatch.setattr("sys.argv", ["bench_direction_prefix.py", "--model", str(tiny_dirs["qwen2"]), "--data-dir",
                                     str(tiny_data_dir), "--n-train", "8", "--n-val", "4", "--batch-size", "4",
                                     "--max-new-tokens", "3"])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["n_train"], out["n_val"]) == (8, 4) and out["candidates"] > 1
    for way in ("plain", "shared"):
        parts = [out[f"{part}_{way}_s"] for part in ("mean_activations", "scoring", "held_out_asr")]
        assert min(parts) > 0 and sum(parts) <= out[f"total_{way}_s"] + 0.02  # each rounded to 0.01 s
    assert out["same_choice"] and out["measured_plain"] == out["measured_shared"]
    assert out["score_max_abs_diff"] < 1e-3 < out["score_range"] and out["scoring_batches_split"] > 0
    assert out["direction_rel_diff"] < 1e-4 and out["mean_diffs_max_rel_diff"] < 1e-4
