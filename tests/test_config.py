"""Layered options (flags > REFUSALSCOPE_* env > TOML > defaults), layer specs, and the CLI option builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refusalscope.cli import build_parser
from refusalscope.config import AsrSettings, DirectionSettings, parse_layers, read_toml, resolve
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.registry import DEFAULT_MODEL


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # REFUSALSCOPE_* from the caller's shell would otherwise leak into every resolve()
    for key in list(os.environ):
        if key.upper().startswith("REFUSALSCOPE_"):
            monkeypatch.delenv(key)


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "opts.toml"
    p.write_text(text)
    return p


def _direction(flags=None, toml=None):
    return resolve(DirectionSettings, {"out": "run", **(flags or {})}, toml, "direction")


# --- resolve -------------------------------------------------------------------------------------------------


def test_defaults():
    s = _direction()
    assert s.out == Path("run")
    assert (s.model, s.device, s.dtype, s.batch_size) == (DEFAULT_MODEL, "auto", "auto", 16)
    assert (s.n_train, s.n_val, s.positions, s.layers, s.filters) == (128, 32, "last", None, [])
    assert (s.harmful_train, s.harmless_val, s.allow_overlap, s.seed) == ("harmful_train", "harmless_val", False, 0)
    assert s.model_fields_set == {"out"}  # only what was given counts as set


def test_asr_defaults():
    s = resolve(AsrSettings, {"run": "r", "prompts": "advbench"}, None, "asr")
    assert (s.intervention, s.judge, s.overlap, s.json_output, s.limit) == ("none", "substring", "drop", False, None)


def test_toml_top_level_and_table_table_wins(tmp_path):
    f = _toml(tmp_path, 'n_train = 10\nbatch-size = 4\nseed = 7\n\n'
                        '[direction]\nn_train = 20\nfilters = ["kl", "steer"]\n\n[asr]\nseed = 99\n')
    s = _direction(toml=f)
    assert s.n_train == 20  # the [direction] table beats the top level
    assert s.batch_size == 4  # hyphenated keys map to fields
    assert s.seed == 7  # another command's table is ignored
    assert s.filters == ["kl", "steer"]


def test_env_beats_toml(tmp_path, monkeypatch):
    f = _toml(tmp_path, "[direction]\nn_train = 20\nbatch_size = 4\n")
    monkeypatch.setenv("REFUSALSCOPE_N_TRAIN", "30")
    s = _direction(toml=f)
    assert (s.n_train, s.batch_size) == (30, 4)


def test_flags_beat_env_and_toml(tmp_path, monkeypatch):
    f = _toml(tmp_path, "n_train = 20\n")
    monkeypatch.setenv("REFUSALSCOPE_N_TRAIN", "30")
    monkeypatch.setenv("REFUSALSCOPE_SEED", "5")
    s = _direction({"n_train": 40}, toml=f)
    assert (s.n_train, s.seed) == (40, 5)


def test_env_parses_types(monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_ALLOW_OVERLAP", "true")
    monkeypatch.setenv("REFUSALSCOPE_FILTERS", '["kl", "prune"]')  # complex types come as JSON
    monkeypatch.setenv("REFUSALSCOPE_LAYERS", "none")
    s = _direction()
    assert (s.allow_overlap, s.filters, s.layers) == (True, ["kl", "prune"], None)


def test_toml_does_not_leak_into_the_next_resolve(tmp_path):
    _direction(toml=_toml(tmp_path, "n_train = 20\n"))
    assert _direction().n_train == 128


def test_unknown_toml_key_is_named(tmp_path):
    f = _toml(tmp_path, "n_train = 2\n[direction]\nbogus_option = 1\n")
    with pytest.raises(RefusalScopeError, match="bogus_option"):
        _direction(toml=f)


def test_invalid_toml(tmp_path):
    with pytest.raises(RefusalScopeError, match="not valid TOML"):
        _direction(toml=_toml(tmp_path, "n_train = = 3\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(RefusalScopeError, match="config file not found"):
        _direction(toml=tmp_path / "absent.toml")


@pytest.mark.parametrize("flags,option", [({"n_train": 0}, "--n-train"), ({"batch_size": "x"}, "--batch-size"),
                                          ({"positions": "first"}, "--positions"),
                                          ({"prune_fraction": 1.0}, "--prune-fraction")])
def test_invalid_value_names_the_flag(flags, option):
    with pytest.raises(RefusalScopeError, match=f"invalid options:\\s+{option}:"):
        _direction(flags)


def test_invalid_value_from_env_and_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_BATCH_SIZE", "many")
    with pytest.raises(RefusalScopeError, match="--batch-size"):
        _direction()
    monkeypatch.delenv("REFUSALSCOPE_BATCH_SIZE")
    with pytest.raises(RefusalScopeError, match="--n-val"):
        _direction(toml=_toml(tmp_path, "n_val = 0\n"))


def test_all_errors_are_listed():
    with pytest.raises(RefusalScopeError) as e:
        _direction({"n_train": 0, "filters": ["kl", "bogus"]})
    assert "--n-train" in str(e.value) and "--filters.1" in str(e.value)


def test_required_field_missing():
    with pytest.raises(RefusalScopeError, match="--out: Field required"):
        resolve(DirectionSettings, {}, None, "direction")


def test_required_field_from_toml(tmp_path):
    assert _direction(toml=_toml(tmp_path, 'out = "elsewhere"\n')).out == Path("run")  # flag wins
    s = resolve(DirectionSettings, {}, _toml(tmp_path, '[direction]\nout = "from-toml"\n'), "direction")
    assert s.out == Path("from-toml")


def test_read_toml_without_path():
    assert read_toml(None, "direction") == {}


# --- parse_layers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,expected", [
    (None, list(range(10))), ("all", list(range(10))), ("", list(range(10))),
    ("4-6", [4, 5, 6]), ("1,3", [1, 3]), ("3-", [3, 4, 5, 6, 7, 8, 9]), ("-2", [0, 1, 2]),
    ("7, 2-3, 2", [2, 3, 7]), ("9", [9]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 10) == expected


@pytest.mark.parametrize("spec,bad", [("4-12", "[10, 11, 12]"), ("10", "[10]")])
def test_parse_layers_out_of_range(spec, bad):
    with pytest.raises(RefusalScopeError, match=rf"{bad}.*0\.\.9"):
        parse_layers(spec, 10)


@pytest.mark.parametrize("spec", ["x", "3-x", "1-2-3", "a,b", "2.5"])
def test_parse_layers_garbage(spec):
    with pytest.raises(RefusalScopeError, match="cannot read layers"):
        parse_layers(spec, 10)


# --- CLI builder ---------------------------------------------------------------------------------------------


def test_cli_direction_namespace():
    ns = build_parser().parse_args(["direction", "--out", "X", "--filters", "kl,steer", "--layers", "3-5"])
    assert ns.command == "direction"
    assert (ns.out, ns.filters, ns.layers) == ("X", ["kl", "steer"], "3-5")
    # options not on the command line stay absent so env/TOML/defaults can fill them
    for name in ("n_train", "batch_size", "model", "allow_overlap", "positions", "data_dir"):
        assert not hasattr(ns, name)


def test_cli_absent_flags_let_toml_fill(tmp_path):
    ns = build_parser().parse_args(["direction", "--out", "X", "--n-train", "3"])
    flags = {k: v for k, v in vars(ns).items() if k in DirectionSettings.model_fields}
    s = resolve(DirectionSettings, flags, _toml(tmp_path, "n_train = 9\nn_val = 5\n"), "direction")
    assert (s.n_train, s.n_val) == (3, 5)


def test_cli_json_maps_to_json_output():
    ns = build_parser().parse_args(["asr", "--run", "R", "--prompts", "p.txt", "--json"])
    assert ns.json_output is True and not hasattr(ns, "json")
    ns = build_parser().parse_args(["asr", "--run", "R", "--prompts", "p.txt", "--no-json"])
    assert ns.json_output is False
    assert not hasattr(build_parser().parse_args(["asr", "--run", "R", "--prompts", "p"]), "json_output")


def test_cli_bool_and_choices():
    ns = build_parser().parse_args(["direction", "--out", "X", "--allow-overlap", "--positions", "post-instruction"])
    assert ns.allow_overlap is True and ns.positions == "post-instruction"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["direction", "--out", "X", "--positions", "middle"])


# --- regressions: bugs found by these tests and fixed --------------------------------------------------------


@pytest.mark.parametrize("spec", ["5-3", ",", "1--2"])
def test_parse_layers_empty_selection_is_an_error(spec):
    with pytest.raises(RefusalScopeError):
        parse_layers(spec, 10)


def test_env_comma_list(monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_FILTERS", "kl,steer")
    try:  # either fix is fine: accept the comma form, or explain the JSON form in a RefusalScopeError
        assert _direction().filters == ["kl", "steer"]
    except RefusalScopeError:
        pass


def test_example_file_is_generated_from_the_settings():
    """refusalscope.example.toml lists every option with its default; a new or changed option must regenerate it
    (python -c 'import refusalscope.config as c; print(c.example_toml())')."""
    import tomllib

    from refusalscope.config import RunSettings, example_toml

    path = Path(__file__).resolve().parents[1] / "refusalscope.example.toml"
    assert path.read_text().rstrip("\n") == example_toml().rstrip("\n")  # as print() or write_text() left it
    run = tomllib.loads(path.read_text())["run"]
    assert run["compile-generation"] == RunSettings.model_fields["compile_generation"].default
    assert run["shared-rows"] is RunSettings.model_fields["shared_rows"].default
