"""benchmarks/bench_sae_holding.py at toy size: each holding is what it says, bfloat16 holds half the bytes, and
auto picks bfloat16 when told float32 would not fit."""

import json

from helpers import load_benchmark


def test_holding_benchmark_reports_each_dtype(tmp_path, monkeypatch, capsys):
    bench = load_benchmark(monkeypatch, "bench_sae_holding")
    out_json = tmp_path / "holding.json"
    monkeypatch.setattr("sys.argv", ["bench_sae_holding.py", "--dir", str(tmp_path / "set"), "--layers", "2",
                                     "--width", "128", "--d", "16", "--json", str(out_json)])
    bench.main()
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(out_json.read_text())
    runs = {(r["dtype_setting"], r["told_available_gb"] is not None): r for r in out["runs"]}
    assert runs[("float32", False)]["held_dtype"] == runs[("auto", False)]["held_dtype"] == "float32"
    assert runs[("bfloat16", False)]["held_dtype"] == runs[("auto", True)]["held_dtype"] == "bfloat16"
    f32, bf16 = runs[("float32", False)], runs[("bfloat16", False)]
    assert f32["layers"] == 2 and f32["held_gb"] == f32["float32_set_gb"]
    # W_enc and W_dec in half the bytes; biases and thresholds (2 x 128 + 16 numbers per layer) stay float32
    assert abs((f32["held_gb"] - bf16["held_gb"]) * 1e9 - 2 * 2 * 128 * 16 * 2) < 1e-3
