"""benchmarks/bench_hydra_outputs.py on the tiny finished run's hydra analysis: one copy rewrites the analysis'
own tables, more copies multiply the edge rows, and ``--distinct`` copies share no edge."""

import json

import pandas as pd

from helpers import load_benchmark
from refusalscope.analysis.registry import run_analysis
from refusalscope.config import HydraSettings


def test_copies_multiply_the_edges_and_distinct_copies_share_none(finished_run, monkeypatch, tmp_path):
    run, judge = finished_run
    run_analysis("hydra", HydraSettings(run=run), progress=False, judge=judge)
    bench = load_benchmark(monkeypatch, "bench_hydra_outputs")
    path = tmp_path / "out.json"
    one = bench.main(["--run", str(run), "--copies", "1", "--out", str(tmp_path / "one"), "--json", str(path)])
    assert json.loads(path.read_text()) == one and one["edge_rows"] > 0 and one["write_outputs_s"] > 0
    edges = "analyses/hydra/edges.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / edges), pd.read_parquet(run / edges))
    same = bench.main(["--run", str(run), "--copies", "2"])
    apart = bench.main(["--run", str(run), "--copies", "2", "--distinct", "--out", str(tmp_path / "two")])
    assert same["prompts"] == apart["prompts"] == 2 * one["prompts"]
    assert same["edge_rows"] == apart["edge_rows"] == 2 * one["edge_rows"]
    pairs = pd.read_parquet(tmp_path / "two" / edges)[["source", "target"]].drop_duplicates()
    assert len(pairs) == 2 * len(pd.read_parquet(run / edges)[["source", "target"]].drop_duplicates())
