import pytest
import torch

from helpers import count_calls
from refusalscope.config import DirectionSettings
from refusalscope.data import load_prompts
from refusalscope.direction import load_direction, mean_difference, run_direction
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.inference import collect_residuals
from refusalscope.store import RunStore


def _settings(tiny_dirs, tiny_data_dir, tmp_path, **kw):
    base = dict(model=str(tiny_dirs["qwen2"]), out=tmp_path / "run", data_dir=str(tiny_data_dir), n_train=8, n_val=4,
                max_new_tokens=4, batch_size=8, asr_candidates=2)
    return DirectionSettings(**{**base, **kw})


def test_direction_end_to_end_on_tiny_model(tiny_lm, tiny_dirs, tiny_data_dir, tmp_path):
    s = _settings(tiny_dirs, tiny_data_dir, tmp_path, positions="post-instruction")
    store = RunStore(s.out)
    summary = run_direction(tiny_lm, s, store)
    for name in ("direction.safetensors", "direction.json", "direction_candidates.parquet",
                 "cosine_diagnostics.parquet", "cosine_diagnostics.png", "prompts_used.json"):
        assert store.exists(name), name
    table = store.read_table("direction_candidates.parquet")
    n_pos = len(summary["positions"])
    assert len(table) == tiny_lm.n_layers * n_pos and n_pos > 1
    # the selected candidate has the best held-out ASR among those measured, ties broken by score
    measured = table[table.asr.notna()]
    assert len(measured) == 2
    best = measured.sort_values(["asr", "ablation_score"], ascending=[False, True]).iloc[0]
    sel = table[table.selected].iloc[0]
    assert (sel.layer, sel.position) == (best.layer, best.position) == (summary["layer"], summary["position"])
    # measured candidates are the two lowest ablation scores
    assert set(measured.index) == set(table.nsmallest(2, "ablation_score").index)

    # reference: the saved direction is mean(harmful) - mean(harmless) at (l*, position)
    direction, meta = load_direction(store)
    harm = load_prompts("harmful_train", data_dir=tiny_data_dir, limit=8).texts
    safe = load_prompts("harmless_train", data_dir=tiny_data_dir, limit=8).texts
    pos = [summary["position"]]
    ref = (collect_residuals(tiny_lm, harm, pos, progress=False).mean(0)
           - collect_residuals(tiny_lm, safe, pos, progress=False).mean(0))[summary["layer"], 0]
    assert torch.allclose(direction, ref, atol=1e-4)
    assert meta["norm"] == pytest.approx(float(ref.norm()), rel=1e-4)
    cos = store.read_table("cosine_diagnostics.parquet")
    assert set(cos.group) == {"harmful", "harmless"} and len(cos) == 2 * tiny_lm.n_layers


def test_mean_difference_matches_collected(tiny_lm):
    a = collect_residuals(tiny_lm, ["x", "y"], [-2, -1], progress=False)
    b = collect_residuals(tiny_lm, ["z"], [-2, -1], progress=False)
    md = mean_difference(a, b)
    assert torch.allclose(md[1, 3], a[:, 3, 1].mean(0) - b[0, 3, 1])


def test_filters_fall_back_and_say_so(tiny_lm, tiny_dirs, tiny_data_dir, tmp_path):
    s = _settings(tiny_dirs, tiny_data_dir, tmp_path, filters=["kl", "steer", "prune"], kl_threshold=-1.0,
                  layers="1-3", asr_candidates=1)
    summary = run_direction(tiny_lm, s, RunStore(s.out))
    assert "falling back" in summary["note"]
    table = RunStore(s.out).read_table("direction_candidates.parquet")
    assert not table.passes.any() and {"kl", "steer_score"} <= set(table.columns)
    assert sorted(table.layer) == [1, 2, 3]


def test_overlapping_train_and_val_is_refused(tiny_lm, tiny_dirs, tiny_data_dir, tmp_path):
    s = _settings(tiny_dirs, tiny_data_dir, tmp_path, harmful_val="harmful_train")
    with pytest.raises(RefusalScopeError, match="--allow-overlap"):
        run_direction(tiny_lm, s, RunStore(s.out))


def test_shared_prefix_gives_the_plain_candidates_and_choice(tiny_lm, tiny_dirs, tiny_data_dir, tmp_path, monkeypatch):
    """Step 1-2 with the template prefix once per batch (the default) against the plain forward: mean differences,
    every filter value and the chosen candidate agree up to float rounding; every batch split."""
    from refusalscope.lm import inference

    split = count_calls(monkeypatch, inference, "suffix_forward")
    last = count_calls(monkeypatch, inference, "suffix_last_logits")
    kw = dict(positions="post-instruction", filters=["kl", "steer"], kl_threshold=10.0, steer_threshold=-100.0)
    runs = {}
    for share in (True, False):
        s = _settings(tiny_dirs, tiny_data_dir, tmp_path / str(share), share_prefix=share, **kw)
        summary = run_direction(tiny_lm, s, RunStore(s.out))
        table = RunStore(s.out).read_table("direction_candidates.parquet")
        runs[share] = summary, table, load_direction(RunStore(s.out))[0]
        if share:
            assert len(split) == 2 and len(last) > 0  # the two training sets, and every scoring forward
            calls = len(split), len(last)
    assert (len(split), len(last)) == calls  # the plain run split nothing
    (a, ta, da), (b, tb, db) = runs[True], runs[False]
    assert (a["layer"], a["position"]) == (b["layer"], b["position"])
    assert torch.allclose(da, db, atol=1e-4)
    for col in ("ablation_score", "kl", "steer_score"):
        assert torch.allclose(torch.tensor(ta[col].values), torch.tensor(tb[col].values), atol=1e-3,
                              equal_nan=True), col  # layer 0's mean difference is 0: no score
    assert (ta.asr.fillna(-1) == tb.asr.fillna(-1)).all()
