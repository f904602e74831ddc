"""benchmarks/pipeline_gpu.py at toy size on the CPU, so the GPU benchmark cannot rot: every stage and per-prompt
analysis is timed, every sweep runs to its cap, the once-per-run work (FM, CE texts) is counted, and the reference
ratios are there."""

import json

import pytest

from helpers import load_benchmark


def test_pipeline_benchmark_runs_every_stage_at_toy_size(tmp_path, monkeypatch, capsys):
    bench = load_benchmark(monkeypatch, "pipeline_gpu")
    path = tmp_path / "out.json"
    out = bench.main(["--toy", "--prompts", "2", "--prompt-batch", "2", "--direction-prompts", "2", "--json",
                      str(path)])
    assert json.loads(path.read_text()) == out
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == out  # the last line is the JSON object
    assert bench.STAGES == ("stage1", "stage2", "controls", "stage3", "hydra", "obrien", "ce")
    for stage in bench.STAGES:
        assert stage in printed
        times = out["per_prompt"][stage]
        assert len(times["seconds"]) == 2 and times["seconds_mean"] > 0 and times["rss_high_water_mb"] > 0
        ref = out["reference"][stage]
        # seconds are rounded to 3 decimals after the ratio was computed: bound it by that rounding
        lo = (ref["reference_s"] - 5e-4) / (ref["fast_s"] + 5e-4)
        hi = (ref["reference_s"] + 5e-4) / max(ref["fast_s"] - 5e-4, 1e-9)
        assert ref["reference_s"] > 0 and lo * 0.99 - 0.005 <= ref["ratio"] <= hi * 1.01 + 0.005  # ratio: 2 decimals
    total = out["reference"]["total"]
    assert total["reference_s"] == pytest.approx(sum(out["reference"][s]["reference_s"] for s in bench.STAGES),
                                                 abs=5e-3)
    assert total["ratio"] == pytest.approx(total["reference_s"] / total["fast_s"], rel=0.02, abs=0.01)
    assert "warm_ratio" not in total  # both prompts ran in the first group: no warm prompt to compare
    # a line after each reference form: the ratio so far only grows, and after the last it is the whole ratio
    partial = [json.loads(ln.split(":", 1)[1]) for ln in printed.splitlines() if ln.startswith("reference so far:")]
    assert [x["after"] for x in partial] == list(bench.STAGES)
    bounds = [x["ratio_at_least"] for x in partial]
    assert bounds == sorted(bounds) and bounds[0] > 0 and "warm_ratio_at_least" not in partial[-1]
    assert partial[-1]["reference_s"] == pytest.approx(total["reference_s"], abs=5e-3)
    assert bounds[-1] == pytest.approx(total["ratio"], rel=0.02, abs=0.01)
    assert out["estimate"] is None  # nor one to estimate a longer run from
    assert out["direction_s_per_run"] > 0 and out["ranking_s_per_run"] >= 0
    # worst case, whatever the random model says: Stage 1 tries every K, Stage 2 covers the whole chain of all
    # three seeds (scored or exactly skipped), Stage 3 judges every K of the sweep, the probe's and Stage-3 only
    toy = bench.TOY
    d = out["detail"]
    assert d["stage1_k_tried"] == [toy["k_cap"] // 10] * 2
    n = out["stage2_candidates"]
    assert n == toy["k_cap"] * (out["n_layers"] - 3)
    assert [a + b for a, b in zip(d["stage2_sets_scored"], d["stage2_steps_skipped"])] == [1 + 3 * (n // 5)] * 2
    assert d["stage3_rows"] == [len(out["stage3_k"]) + 2 + 1] * 2
    assert min(out["active_features_per_prompt"]) > max(out["stage3_k"])  # Stage 3 has enough candidates
    assert out["prompt_batch"] == 2 and out["generation_batch"] == 2 * toy["batch_size"]
    assert out["reference"]["stage2"]["same_sets"] == "1 of 1"  # fp32: the fast path keeps the reference's sets
    # the analyses: the Stage-2 set's dormant features found by hydra, the O'Brien sets shrinking with k
    assert d["hydra_dormant"] == [toy["dormant"]] * 2 and len(d["hydra_wakes"]) == 2 and min(d["hydra_wakes"]) > 0
    assert all(len(x) == 8 and x == sorted(x, reverse=True) and x[0] > 0 for x in d["obrien_sets"])
    # once per run: the FM on fm_prompts of each side (80/10/10 of both), trained; the CE texts of both corpora
    fm, ce = out["fm_per_run"], out["ce_texts_per_run"]
    assert fm["rows"] == 2 * toy["fm_prompts"] and fm["columns"] > 0 and fm["training"] > 0
    assert fm["activations"] > 0 and fm["layout"] in ("max", "positions")
    assert ce["texts"] == 2 * toy["ce_texts"] and 0 < ce["tokens"] <= ce["texts"] * toy["ce_max_tokens"]
    assert "once per run: Stage 3's FM dataset" in printed


def test_pipeline_benchmark_with_saes_held_in_bfloat16(monkeypatch):
    """--sae-dtype bfloat16 (what a real LlamaScope-131k set needs on the host): each layer held in bfloat16, the
    stages convert what they use, and the fast path still keeps the reference's Stage-2 sets (same held values)."""
    bench = load_benchmark(monkeypatch, "pipeline_gpu")
    out = bench.main(["--toy", "--prompts", "1", "--direction-prompts", "2", "--sae-dtype", "bfloat16",
                      "--stage3-k", "4", "--probe-k", "4"])
    assert out["sae_dtype"] == "bfloat16" and out["sae_stage_dtype"] == "bfloat16"  # a CPU run keeps the holding
    assert out["reference"]["stage2"]["same_sets"] == "1 of 1"
    assert all(out["per_prompt"][s]["seconds_mean"] > 0 for s in bench.STAGES)


def test_pipeline_benchmark_compiles_generation_once_per_shape(tmp_path, monkeypatch):
    """With --compile-generation the second prompt reuses the first prompt's compiled decode steps (padded
    ablations, bucketed rows and prompt length): no new graph after the first prompt."""
    out = _compiled_toy(monkeypatch, "--compile-generation")
    # the first prompt pays the compiles; the ratio against the second one leaves them out
    total = out["reference"]["total"]
    stages = list(out["per_prompt"])  # the benchmark's STAGES, in order
    warm = sum(out["per_prompt"][s]["seconds"][1] for s in stages)
    assert total["warm_fast_s"] == pytest.approx(warm, abs=5e-3)
    assert total["warm_ratio"] == pytest.approx(total["reference_s"] / total["warm_fast_s"], rel=0.02, abs=0.01)
    assert out["partial_reference"][-1]["warm_ratio_at_least"] == pytest.approx(total["warm_ratio"], rel=0.02,
                                                                               abs=0.01)
    # AdvBench-520 at these sweep sizes: once-per-run work (setup, direction, ranking, the FM, the CE texts), the
    # first prompt, 519 more at the second's time
    est = out["estimate"]
    fm = out["fm_per_run"]
    once = (sum(out["setup_s"].values()) + out["direction_s_per_run"] + out["ranking_s_per_run"]
            + fm["activations"] + fm["training"] + out["ce_texts_per_run"]["seconds"])
    first = sum(out["per_prompt"][s]["seconds"][0] for s in stages)
    assert est["prompts"] == 520 and est["later_s_per_prompt"] == pytest.approx(warm, abs=5e-3)
    assert est["minutes"] == pytest.approx((once + first + 519 * warm) / 60, abs=0.1)


def test_pipeline_benchmark_compiles_scoring_layers_once(tmp_path, monkeypatch):
    """With --compile-scoring the second prompt's Stage 2 reuses the first prompt's compiled decoder layers, and
    the fast path still keeps the reference's sets."""
    out = _compiled_toy(monkeypatch, "--compile-scoring")
    assert out["reference"]["stage2"]["same_sets"] == "1 of 1"


def _compiled_toy(monkeypatch, flag: str) -> dict:
    """The toy benchmark on 2 prompts (reference forms on the first) with ``flag`` aot_eager, from a fresh dynamo;
    asserts that the second prompt compiled no new graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    bench = load_benchmark(monkeypatch, "pipeline_gpu")
    torch._dynamo.reset()
    counters.clear()  # reset() keeps dynamo's counters, which the benchmark reports
    out = bench.main(["--toy", "--prompts", "2", "--direction-prompts", "2", "--reference-prompts", "1",
                      flag, "aot_eager"])
    graphs = out["detail"]["compiled_graphs"]
    assert out[flag[2:].replace("-", "_")] == "aot_eager" and len(graphs) == 2
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    return out
