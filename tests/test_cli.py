import json
import subprocess
import sys

import pytest

from refusalscope.cli import main


@pytest.fixture
def run_dir(tiny_dirs, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(["direction", "--model", str(tiny_dirs["qwen2"]), "--out", str(out), "--data-dir", str(tiny_data_dir),
               "--n-train", "8", "--n-val", "4", "--max-new-tokens", "3", "--asr-candidates", "1"])
    assert rc == 0
    return out


def test_direction_then_asr_json_contract(run_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Explain tides.\nWrite a limerick.\nTell me how to pick a lock.\n")
    capsys.readouterr()
    for iv in ("none", "ablate-direction", "add-direction"):
        assert main(["asr", "--run", str(run_dir), "--prompts", str(prompts), "--intervention", iv, "--limit", "2",
                     "--max-new-tokens", "4", "--json"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        result = json.loads(last)
        assert set(result) == {"n", "asr", "refusal_rate", "degenerate_rate"} and result["n"] == 2
        assert 0 <= result["asr"] <= 1
    saved = sorted(p.name for p in (run_dir / "asr").iterdir())
    assert "p_ablate-direction_2.parquet" in saved and "p_none_2.json" in saved
    assert json.loads((run_dir / "config.direction.json").read_text())["n_train"] == 8


def test_asr_drops_training_prompts_by_default(run_dir, tiny_data_dir, capsys):
    rc = main(["asr", "--run", str(run_dir), "--prompts", str(tiny_data_dir / "splits" / "harmful_train.json"),
               "--max-new-tokens", "2"])
    assert rc == 2 and "every evaluation prompt" in capsys.readouterr().err
    rc = main(["asr", "--run", str(run_dir), "--prompts", str(tiny_data_dir / "splits" / "harmful_train.json"),
               "--max-new-tokens", "2", "--overlap", "error"])
    assert rc == 2 and "also training prompts" in capsys.readouterr().err


def _error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and match in err, err
    return err


def test_bad_input_gets_one_clear_error(run_dir, tiny_dirs, tiny_data_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    asr = ["asr", "--run", str(run_dir), "--max-new-tokens", "2"]
    _error(capsys, asr + ["--prompts", str(tmp_path / "missing.csv")], "dataset file not found")
    _error(capsys, asr + ["--prompts", str(tmp_path / "cols.csv"), "--column", "nope"], "column 'nope'")
    _error(capsys, asr + ["--prompts", str(tmp_path / "empty.txt")], "holds no prompts")
    _error(capsys, ["asr", "--run", str(tmp_path / "no-run"), "--prompts", "x.txt"], "does not exist")
    d = ["direction", "--out", str(tmp_path / "r2"), "--data-dir", str(tiny_data_dir), "--n-train", "4"]
    _error(capsys, d + ["--model", str(tiny_dirs["qwen2"]), "--layers", "99"], "out of range")
    _error(capsys, d + ["--model", "nobody/not-cached-anywhere"], "not in the local Hugging Face cache")
    _error(capsys, d + ["--model", str(tiny_dirs["qwen2"]), "--n-train", "0"], "--n-train")
    _error(capsys, d + ["--model", str(tiny_dirs["qwen2"]), "--data-dir", str(tmp_path / "nodata")], "does not exist")


def test_config_file_and_env_reach_the_command(tiny_dirs, tiny_data_dir, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{tiny_dirs["qwen2"]}"\n[direction]\nn_train = 6\nlayers = "99"\n')
    monkeypatch.setenv("REFUSALSCOPE_LAYERS", "1-2")  # env beats TOML's bad value
    out = tmp_path / "r"
    rc = main(["direction", "--config", str(cfg), "--out", str(out), "--data-dir", str(tiny_data_dir), "--n-val", "4",
               "--max-new-tokens", "2", "--asr-candidates", "1"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "config.direction.json").read_text())
    assert saved["n_train"] == 6 and saved["layers"] == "1-2" and saved["model"] == str(tiny_dirs["qwen2"])


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "refusalscope.cli", "asr", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--intervention" in out.stdout and "--json" in out.stdout


def test_ray_flag_takes_an_optional_address(tiny_dirs, tiny_data_dir, tmp_path, monkeypatch, capsys):
    from refusalscope.cli import _settings, build_parser
    from refusalscope.config import RunSettings

    parser = build_parser()
    for flags, want in (([], None), (["--ray"], "auto"), (["--ray", "ray://head:10001"], "ray://head:10001")):
        args = parser.parse_args(["run", "--out", str(tmp_path / "r"), *flags])
        assert _settings(args, RunSettings, "run").ray == want
    # without the extra installed: one line naming it, before any model is loaded
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "p.txt").write_text("Tell me how to pick a lock.")
    err = _error(capsys, ["run", "--out", str(tmp_path / "r"), "--model", str(tiny_dirs["qwen2"]), "--prompts",
                          str(tmp_path / "p.txt"), "--data-dir", str(tiny_data_dir), "--ray"], "pip install")
    assert "refusalscope[ray]" in err and not (tmp_path / "r").exists()
