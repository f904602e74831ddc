"""benchmarks/bench_analysis_groups.py on the tiny finished run: both analyses in groups give the one-at-a-time
files, and every group size is timed."""

import json

import pytest

from helpers import load_benchmark


@pytest.mark.parametrize("analysis", ["controls", "hydra"])
def test_groups_give_the_one_at_a_time_files(finished_run, monkeypatch, tmp_path, analysis):
    run, _ = finished_run
    bench = load_benchmark(monkeypatch, "bench_analysis_groups")
    path = tmp_path / "out.json"
    out = bench.main(["--run", str(run), "--analysis", analysis, "--n", "3", "--groups", "1,3", "--judge",
                      "substring", "--json", str(path)])
    assert json.loads(path.read_text()) == out
    assert list(out["by_group"]) == ["1", "3"]
    for g in out["by_group"].values():
        assert g["prompts"] == 3 and g["same_files_as_first"] and g["differences"] == {} and g["seconds"] > 0
        assert g["judge"].startswith("substring") and 0 < g["generate_s"] < g["seconds"]
        assert (0 < g["record_s"] < g["seconds"]) if analysis == "hydra" else "record_s" not in g
    assert not (run / "analyses" / analysis).exists()  # the run itself is left alone


def test_differences_name_the_json_paths(monkeypatch):
    bench = load_benchmark(monkeypatch, "bench_analysis_groups")
    a = {"id": 1, "obrien": [{"k": 1, "completion": "x"}, {"k": 2, "completion": "y"}], "gone": 1}
    b = {"id": 1, "obrien": [{"k": 1, "completion": "x"}, {"k": 2, "completion": "z"}], "new": 2}
    assert bench.differences(a, b) == [".gone", ".new", ".obrien[1].completion"]
    assert bench.differences(a, a) == [] and bench.differences([1, 2], [1]) == ["."]
