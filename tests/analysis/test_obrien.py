"""Controls (analysis/obrien.py): per-token counts against a plain loop, the O'Brien et al. sets, the random controls
tabulated from the run, completions reused from the run's cache, per-prompt files reused on a rerun."""

import json
import sqlite3

import pandas as pd
import pytest
import torch

from helpers import analysis_alone_and_grouped, random_sae, spy_generate
from refusalscope.analysis import obrien
from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.analysis.registry import run_analysis
from refusalscope.config import ControlsSettings
from refusalscope.lm.prompts import format_chat
from refusalscope.saes.features import active_features

PROMPT = "Tell me how to pick a lock."


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_token_counts_match_plain_loop_and_sets_nest(tiny_lm, arch):
    saes = {layer: random_sae(arch, d=tiny_lm.d_model, m=40, layer=layer, seed=layer) for layer in (1, 3)}
    fast = obrien.token_counts(tiny_lm, saes, PROMPT)
    ref = obrien.reference_token_counts(tiny_lm, saes, PROMPT)
    assert set(fast) == {1, 3}
    for layer in fast:
        assert torch.equal(fast[layer].cpu(), ref[layer])
    n_tokens = len(tiny_lm.tokenizer.encode(format_chat(tiny_lm.tokenizer, [PROMPT])[0], add_special_tokens=False))
    assert max(int(c.max()) for c in fast.values()) <= n_tokens
    sets = [obrien.active_on_at_least(fast, k) for k in (1, 2, 4, 8, n_tokens + 1)]
    for bigger, smaller in zip(sets, sets[1:]):
        assert set(smaller) <= set(bigger)
    assert sets[-1] == []
    # k = 1 is exactly "max activation over the prompt > 0" (computed by the stages' own path)
    assert sets[0] == sorted(active_features(tiny_lm, PROMPT, saes))
    assert len(sets[0]) > len(sets[2])  # the sweep really thins the set


def test_stage_layers_follow_the_run_options(finished_run):
    run, judge = finished_run
    assert obrien.stage_layers(FinishedRun(run)) == [1, 2, 3]  # min_layer 1 of SAE layers 0-3
    cfg = json.loads((run / "config.run.json").read_text())
    (run / "config.run.json").write_text(json.dumps({**cfg, "layers": "0,2-"}))
    assert obrien.stage_layers(FinishedRun(run)) == [2, 3]


def _cache_rows(run):
    with sqlite3.connect(run / "completions.sqlite") as db:
        return set(db.execute("SELECT prompt, features FROM completions").fetchall())


def test_controls_analysis_tabulates_sweeps_and_resumes(finished_run, monkeypatch):
    run, judge = finished_run
    calls = spy_generate(monkeypatch)
    ks = [1, 3, 1000]
    before = _cache_rows(run)
    summary = run_analysis("controls", ControlsSettings(run=run, k_values=ks, device="cpu"), progress=False,
                           judge=judge)
    fr = FinishedRun(run, judge=judge)
    out = run / "analyses" / "controls"
    ob = pd.read_parquet(out / "obrien.parquet")
    assert list(ob.columns) == ["id", "k", "n_features", "jailbroken", "refused", "degenerate", "completion"]
    assert len(ob) == len(fr.records) * len(ks)
    ctx = fr.context(layers=[1, 2, 3])
    for rec in fr.records:
        mine = ob[ob.id == rec.id].sort_values("k")
        assert list(mine.k) == ks
        assert list(mine.n_features) == sorted(mine.n_features, reverse=True)
        assert mine.n_features.iloc[0] == len(ctx.activations(rec.prompt))  # active somewhere = k of 1
        none = mine[mine.k == 1000].iloc[0]
        assert none.n_features == 0 and not none.jailbroken  # nothing ablated: the baseline completion, refused
    # only O'Brien sets were generated: the Stage-2 and random sets came from the run's completion cache
    new = _cache_rows(run) - before
    assert sum(len(c) for c in calls) == len(new) > 0
    sizes = {(p, n) for p, n in zip(ob.id.map({r.id: r.prompt for r in fr.records}), ob.n_features)}
    assert all((p, len(json.loads(fs))) in sizes for p, fs in new)

    rnd = pd.read_parquet(out / "random.parquet")
    assert len(rnd) == sum(len(r.controls.random) for r in fr.records)
    for rec in fr.records:
        row = rnd[rnd.id == rec.id].iloc[0]
        ctl = rec.controls.random[0]
        assert list(row.features) == [str(f) for f in ctl.features]
        assert row.completion == ctl.completion and row.jailbroken == ctl.jailbroken
        assert row.stage2_jailbroken == rec.stage2.best().jailbroken and row.stage2_size == len(fr.stage2_set(rec))

    asr = pd.read_parquet(out / "obrien_asr.parquet")
    assert list(asr.k) == ks and list(asr.n) == [len(fr.records)] * len(ks)
    assert asr.asr.tolist() == pytest.approx(ob.groupby("k").jailbroken.mean().tolist())
    assert summary["judge"] == judge.name and summary["obrien"]["max_asr"] == pytest.approx(asr.asr.max())
    assert summary["random"]["asr"] == pytest.approx(rnd.jailbroken.mean())
    assert (out / "obrien.png").stat().st_size > 0
    assert len(list((out / "prompts").glob("*.json"))) == len(fr.records)
    lines = "\n".join(obrien.summary_lines(summary))
    assert judge.name in lines and "0.10" in lines and "ASR by k" in lines

    # rerun: every prompt file is reused (nothing recomputed, nothing generated)
    monkeypatch.setattr(obrien, "token_counts", lambda *a, **k: pytest.fail("a finished prompt was recomputed"))
    again = run_analysis("controls", ControlsSettings(run=run, k_values=ks, device="cpu"), progress=False,
                         judge=judge)
    assert again["obrien"] == summary["obrien"] and again["random"] == summary["random"]
    # other k values: recomputed, and the k already generated come from the completion cache
    monkeypatch.undo()
    calls = spy_generate(monkeypatch)
    run_analysis("controls", ControlsSettings(run=run, k_values=[1, 1000], device="cpu"), progress=False, judge=judge)
    assert calls == []


def test_bad_k_values_fail_before_loading(finished_run, monkeypatch):
    run, judge = finished_run
    monkeypatch.setattr(FinishedRun, "context", lambda *a, **k: pytest.fail("model loaded"))
    from refusalscope.errors import RefusalScopeError

    with pytest.raises(RefusalScopeError, match="k-values"):
        run_analysis("controls", ControlsSettings(run=run, k_values=[0, 2]), progress=False, judge=judge)


def test_prompts_in_groups_give_the_results_of_one_at_a_time(finished_run, monkeypatch, tmp_path):
    """--prompt-batch: a group's O'Brien sets are generated in one call, and every prompt's file is the one it gets
    analysed alone."""
    import shutil

    run, judge = finished_run
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    n = len(FinishedRun(run).records)
    assert n >= 2
    (calls_alone, files_alone), (calls, files) = analysis_alone_and_grouped(
        monkeypatch, run, alone, judge, "controls", ControlsSettings, k_values=[1, 2, 1000])
    assert len(calls_alone) == n and [len(c) for c in calls] == [sum(len(c) for c in calls_alone)]
    assert len(files) == n and files == files_alone
