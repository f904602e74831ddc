"""Stage 3 end to end on a tiny model: `refusalscope interactions` on a Stages 1-2 run, the summary contract, and a
rerun after a crash (kill -9 loses at most the prompt in flight): finished prompts and the FM are reused."""

import json

import pandas as pd
import pytest

from helpers import FakeJudge, untimed, write_tiny_run_inputs
from refusalscope.cli import main
from refusalscope.config import DirectionOptions, RunSettings
from refusalscope.pipeline import run as pipeline
from refusalscope.stages import stage3



@pytest.fixture
def stage12_run(tmp_path, tiny_dirs, tiny_data_dir, tiny_lm, monkeypatch):
    sae_dir, prompt_file, base = write_tiny_run_inputs(tmp_path, tiny_lm)
    monkeypatch.setattr(pipeline, "make_judge", lambda spec: FakeJudge.refuses_baseline(base))
    settings = RunSettings(model=str(tiny_dirs["qwen2"]), out=tmp_path / "run", prompts=str(prompt_file),
                           data_dir=str(tiny_data_dir), saes=str(sae_dir), min_layer=1, k_step=8, k_cap=32,
                           k_chunk=2, tau=[0.0, 0.5], seeds=[0, 1], max_new_tokens=6, batch_size=4, device="cpu",
                           direction=DirectionOptions(n_train=4, n_val=2, asr_candidates=1, max_new_tokens=4))
    pipeline.run_pipeline(settings, progress=False)
    return settings, tmp_path


def _interactions(settings, tmp_path, *extra: str) -> int:
    return main(["interactions", "--run", str(settings.out), "--harmful", str(tmp_path / "harmful.txt"),
                 "--harmless", str(tmp_path / "harmless.txt"), "--first-layer", "0", "--fm-epochs", "2",
                 "--k-values", "2,4,6", "--probe-k", "2,6", "--k-chunk", "2", "--positions", "auto", *extra])


def test_interactions_writes_stage3_and_resumes_without_retraining(stage12_run, monkeypatch, capsys):
    settings, tmp_path = stage12_run
    processed = [json.loads(p.read_text()) for p in sorted((settings.out / "prompts").glob("*.json"))]
    with_sets = [r for r in processed if r.get("stage2") and any(t["features"] for t in r["stage2"]["per_tau"])]
    if not with_sets:
        pytest.skip("Stage 1 jailbroke no prompt of this random model, so Stage 3 has nothing to run on")

    assert _interactions(settings, tmp_path) == 0
    out = capsys.readouterr().out
    assert "FM test accuracy" in out and "probe" in out
    summary = json.loads((settings.out / "summary.json").read_text())
    st3 = summary["stage3"]
    for key in ("fm_test_accuracy", "fm_test_auroc", "probe_equal_k", "stage3_only", "causal"):
        assert key in st3
    assert {"jailbroken", "best_k"} <= set(st3["fm"]) and "jailbroken" in st3["probe"]
    assert {"deactivated_frac", "mean_drop"} <= set(st3["causal"])
    assert set(st3["probe_equal_k"]) == {"2", "6"}
    alone = {r["id"]: min((t for t in r["stage2"]["per_tau"] if t["jailbroken"] and t["features"]),
                          key=lambda t: (len(t["features"]), -t["tau"]), default=None) is not None
             for r in with_sets}
    assert st3["stage2_failed"]["n"] == sum(not v for v in alone.values())
    assert summary["stage2"]  # Stages 1-2 results are kept
    table = pd.read_parquet(settings.out / "stage3.parquet")
    assert set(table.method) >= {"fm", "probe"}
    assert set(table[table.method == "probe"].k) == {2, 6}
    assert (settings.out / "stage3.png").read_bytes()[:4] == b"\x89PNG"
    models = json.loads((settings.out / "stage3" / "models.json").read_text())
    assert models["mode"] in ("max", "positions") and set(models["fm_val_accuracy_by_mode"]) == {"max", "positions"}
    assert models["n_train"] + models["n_val"] + models["n_test"] == 20
    fm, columns = stage3.load_fm(pipeline.RunStore(settings.out))
    assert fm.V.shape == (len(columns), 20)
    files = sorted((settings.out / "stage3" / "prompts").glob("*.json"))
    assert len(files) == len(with_sets)
    first = {f.name: json.loads(f.read_text()) for f in files}

    # kill -9 mid-Stage-3: one prompt's file was never written. The rerun retrains nothing and redoes only it.
    files[0].unlink()
    monkeypatch.setattr(stage3, "train_fm", lambda *a, **k: pytest.fail("the FM was retrained"))
    calls = []
    real = stage3.run_stage3_many

    def spy(ctx, items, *a, **k):
        calls.extend(pid for pid, *_ in items)
        return real(ctx, items, *a, **k)

    monkeypatch.setattr(stage3, "run_stage3_many", spy)
    assert _interactions(settings, tmp_path) == 0
    assert calls == [int(files[0].stem)]
    redone = json.loads(files[0].read_text())
    redone.pop("seconds"), first[files[0].name].pop("seconds")
    assert redone == first[files[0].name]
    assert json.loads((settings.out / "summary.json").read_text())["stage3"] == st3


def test_stage3_prompts_run_together_get_the_results_they_get_alone(stage12_run, capsys):
    import shutil

    settings, tmp_path = stage12_run
    if not any((settings.out / "prompts").glob("*.json")):
        pytest.skip("no processed prompts")
    other = tmp_path / "together"
    shutil.copytree(settings.out, other)
    assert _interactions(settings, tmp_path) == 0
    assert _interactions(settings.model_copy(update={"out": other}), tmp_path, "--prompt-batch", "3") == 0
    files = sorted((settings.out / "stage3" / "prompts").glob("*.json"))
    if not files:
        pytest.skip("Stage 1 jailbroke no prompt of this random model, so Stage 3 has nothing to run on")
    for f in files:
        alone = untimed(json.loads(f.read_text()))
        joint = untimed(json.loads((other / "stage3" / "prompts" / f.name).read_text()))
        assert joint == alone, f.name


def test_interactions_on_a_run_without_stage2_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["interactions", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no finished 'refusalscope run'" in err


def test_stage3_generates_with_the_runs_generation_options(stage12_run):
    """Stage 3 in one process builds its context as a Ray worker does (``steps.stage_context``): a run made with
    --early-stop stops Stage 3's generations too, so both give the same completions."""
    import sqlite3

    settings, tmp_path = stage12_run
    cfg = json.loads((settings.out / "config.run.json").read_text())
    cfg["early_stop"] = True
    (settings.out / "config.run.json").write_text(json.dumps(cfg))
    db = settings.out / "completions.sqlite"
    before = {k for (k,) in sqlite3.connect(db).execute("SELECT key FROM completions")}
    assert _interactions(settings, tmp_path) == 0
    if not list((settings.out / "stage3" / "prompts").glob("*.json")):
        pytest.skip("Stage 1 jailbroke no prompt of this random model, so Stage 3 has nothing to run on")
    rows = sqlite3.connect(db).execute("SELECT key, settings FROM completions").fetchall()
    new = [json.loads(s) for k, s in rows if k not in before]
    assert new and all(s.get("stopped_by") for s in new)
