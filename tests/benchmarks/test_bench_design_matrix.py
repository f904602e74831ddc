"""benchmarks/bench_design_matrix.py at toy size: both layouts are built, pruned and counted."""

import json

from helpers import load_benchmark


def test_design_matrix_benchmark_at_toy_size(monkeypatch, tmp_path):
    bench = load_benchmark(monkeypatch, "bench_design_matrix")
    path = tmp_path / "out.json"
    out = bench.main(["--rows", "20", "--layers", "2-4", "--width", "256", "--l0", "8", "--candidates", "50",
                      "--json", str(path)])
    assert json.loads(path.read_text()) == out
    assert out["entries"] == 20 * 4 * 3 * 8  # rows × positions × layers × l0, distinct within each token
    m, p = out["modes"]["max"], out["modes"]["positions"]
    assert m["columns"] == 3 * 256 and p["columns"] == 4 * 3 * 256
    assert p["nnz"] == out["entries"] and m["nnz"] <= out["entries"]  # max pools a latent's positions
    assert 0 < m["kept"] <= m["columns"] and 0 < p["kept"] <= p["columns"]
    assert all(v["total_s"] >= v["models_s"] >= 0 for v in out["modes"].values())
    assert m["features"] == m["kept"] and 0 < p["features"] <= p["kept"]  # max: a column per feature
    assert m["candidates"] == p["candidates"] == 100  # 50 of the table's features and 50 it lacks
