"""benchmarks/bf16_agreement.py on the finished tiny run: Stages 1-2 run in bf16 on the CPU end to end, and the
report compares them with fp32 (speed, jailbreak counts, Stage-2 set agreement)."""

import json

from helpers import load_benchmark


def test_jaccard(monkeypatch):
    bench = load_benchmark(monkeypatch, "bf16_agreement")
    assert bench.jaccard([[1, 2], [3, 4]], [[3, 4]]) == 0.5
    assert bench.jaccard([], []) == 1.0 and bench.jaccard([[1, 2]], []) == 0.0


def test_bf16_agreement_on_the_tiny_run(finished_run, tmp_path, monkeypatch):
    run, judge = finished_run
    bench = load_benchmark(monkeypatch, "bf16_agreement")
    path = tmp_path / "agree.json"
    out = bench.main(["--run", str(run), "--n", "2", "--json", str(path), "--details"], judge=judge)
    assert json.loads(path.read_text()) == out
    assert out["judge"] == judge.name and out["n_prompts"] == 2
    f32, b16 = out["details"]["float32"], out["details"]["bfloat16"]
    assert f32["dtype"] == "torch.float32" and b16["dtype"] == "torch.bfloat16"
    for dtype in ("float32", "bfloat16"):
        s = out[dtype]
        assert s["stage1_s"] > 0 and set(s["stage2_jailbroken_per_tau"]) == {"0", "0.5"}
        assert s["stage1_jailbroken"] == sum(r["stage1_jailbroken"] for r in out["details"][dtype]["prompts"])
    # fp32 here reproduces the run's own Stage 1 (same model, SAEs, settings and judge)
    recs = {json.loads(p.read_text())["prompt"]: json.loads(p.read_text()) for p in (run / "prompts").glob("*.json")}
    for row in f32["prompts"]:
        assert row["stage1_k"] == recs[row["prompt"]]["stage1"]["k"]
    # bf16 really ran in bf16: P("I") moves a little
    assert all(x["p_refusal"] != y["p_refusal"] for x, y in zip(f32["prompts"], b16["prompts"]))
    agree = out["agreement"]
    assert 0 < agree["p_refusal_max_abs_diff"] < 0.5
    both = agree["stage2_prompts_compared"]
    for t, j in agree["stage2_jaccard_mean_per_tau"].items():
        assert j is None if not both else 0 <= j <= 1
    assert isinstance(agree["same_jailbreak_counts"], bool)
