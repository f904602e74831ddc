"""``refusalscope sae train`` / ``sae eval`` on a tiny model: cached SAEs, the run record, the JSON report."""

import json

import torch

import pytest

from helpers import count_calls
from refusalscope.cli import main


@pytest.fixture
def tiny_run(tmp_path, tiny_dirs, tiny_data_dir, monkeypatch):
    import json as _json

    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "cache"))
    (tiny_data_dir / "splits" / "harmless_test.json").write_text(
        _json.dumps([{"instruction": f"Describe a sunny day, take {i}."} for i in range(6)]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": str(tiny_dirs["llama"]), "device": "cpu",
                                              "data_dir": str(tiny_data_dir)}))
    return run


ARGS = ["--layers", "1,2", "--width", "64", "--k", "4", "--epochs", "1", "--train-batch-size", "16", "--n-eval", "4"]


def test_sae_train_then_eval(tiny_run, capsys):
    assert main(["sae", "train", "--run", str(tiny_run), *ARGS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["layer"] for r in report] == [1, 2]
    assert set(report[0]) == {"layer", "fvu", "l0", "dead_frac", "ce_increase"}
    assert all(r["l0"] <= 4 for r in report)
    rec = json.loads((tiny_run / "saes.json").read_text())
    assert rec["layers"] == [1, 2] and rec["train"]["trained"] == [1, 2]
    # the SAEs are cached: a second run trains nothing
    assert main(["sae", "train", "--run", str(tiny_run), *ARGS, "--json"]) == 0
    capsys.readouterr()
    assert json.loads((tiny_run / "saes.json").read_text())["train"]["reused"] == [1, 2]
    assert main(["sae", "eval", "--run", str(tiny_run), "--n-eval", "4", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["layer"] for r in again] == [1, 2]
    from sae_lens import SAE

    from refusalscope.saes.run_set import resolve_spec
    from refusalscope.store import RunStore

    assert rec["spec"].startswith("cache:saes/")  # where in the cache, not this machine's cache path
    set_dir = resolve_spec(RunStore(tiny_run), rec["spec"])
    loaded = SAE.load_from_disk(set_dir + "/layer_1")  # plain SAELens reads what we saved
    assert loaded.cfg.d_sae == 64


def test_sae_errors_are_clear(tiny_run, capsys):
    assert main(["sae", "train", "--run", str(tiny_run), "--layers", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["sae", "eval", "--run", str(tiny_run)]) == 2
    assert "saes.json" in capsys.readouterr().err
    assert main(["sae", "train", "--run", str(tiny_run / "missing")]) == 2


def test_collect_with_replies_appends_reply_tokens(tiny_lm, tmp_path):
    from refusalscope.saes.training.activations import collect

    bare = collect(tiny_lm, ["Write a poem about the sea."], [1], tmp_path / "a", progress=False)
    with_reply = collect(tiny_lm, [("Write a poem about the sea.", "The sea is blue and wide.")], [1],
                         tmp_path / "b", progress=False)
    assert with_reply[1].shape[0] > bare[1].shape[0]
    # the prompt's tokens come first and are unchanged by what follows (causal)
    assert torch.allclose(with_reply[1][:bare[1].shape[0]].float(), bare[1].float(), atol=1e-3)


def test_share_prefix_option_reaches_both_passes(tiny_run, capsys, monkeypatch):
    """``--no-share-prefix`` runs the plain forward in the activation pass and the quality report alike."""
    from refusalscope.saes import evals
    from refusalscope.saes.training import activations

    collected, evaluated = (count_calls(monkeypatch, module, "suffix_forward") for module in (activations, evals))
    assert main(["sae", "train", "--run", str(tiny_run), *ARGS, "--no-share-prefix", "--json"]) == 0
    assert collected == evaluated == []
    assert main(["sae", "eval", "--run", str(tiny_run), "--n-eval", "4", "--json"]) == 0
    assert collected == [] and evaluated
    evaluated.clear()
    assert main(["sae", "eval", "--run", str(tiny_run), "--n-eval", "4", "--no-share-prefix", "--json"]) == 0
    assert evaluated == []
    capsys.readouterr()
