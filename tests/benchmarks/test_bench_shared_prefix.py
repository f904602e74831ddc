"""benchmarks/bench_shared_prefix.py on a tiny model: the shared prefix computes fewer tokens and agrees with the
plain forward up to rounding, in the activations and in the quality report."""

import json

from helpers import load_benchmark


def test_shared_prefix_benchmark_agrees(tmp_path, monkeypatch, capsys, tiny_dirs, tiny_data_dir):
    (tiny_data_dir / "splits" / "harmless_test.json").write_text(
        json.dumps([{"instruction": f"Describe a sunny day, take {i}."} for i in range(4)]))
    bench = load_benchmark(monkeypatch, "bench_shared_prefix")
    monkeypatch.setattr("sys.argv", ["bench_shared_prefix.py", "--model", str(tiny_dirs["qwen2"]), "--data-dir",
                                     str(tiny_data_dir), "--prompts", "12", "--layers", "1-2", "--width", "64",
                                     "--batch-size", "4", "--chunk-prompts", "8"])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 12 and out["layers"] == 2 and out["prefix_tokens"] > 0
    assert out["same_shapes"] and out["fp16_values_differing"] < 0.05 and out["token_rel_error_max"] < 1e-2
    assert out["batches_split"] == out["batches"] > 1 and out["model_tokens_shared"] < out["model_tokens_plain"]
    assert out["eval_same_tokens"] and max(out["eval_max_rel_diff"].values()) < 1e-4
    assert out["collect_plain_s"] > 0 and out["eval_shared_s"] > 0
