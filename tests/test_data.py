"""Prompt sets: the real data directory, file formats, errors, dedupe, overlap checks and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusalscope.data import (
    DATASETS,
    check_disjoint,
    dedupe,
    drop_overlap,
    load_prompts,
    overlap,
    split,
)
from refusalscope.errors import RefusalScopeError

# /work/shared/data from /work/main; a clean clone works wherever its sibling holds shared/data.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

# Exact sizes; the raw files hold no duplicate prompts, so dedupe removes nothing and these are the row counts.
EXPECTED = {
    "advbench": 520, "harmful_train": 260, "harmful_val": 39, "harmbench_val": 41, "xstest_safe": 250,
    "xstest_unsafe": 200, "coconot_original": 1001, "coconot_contrast": 379,
    "alpaca": 2000, "harmless_train": 1000, "harmless_val": 1000, "harmless_test": 1000, "xstest": 450,
    "coconot": 1380,
}


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    # A REFUSALSCOPE_DATA from the caller's shell must not change what these tests load.
    monkeypatch.delenv("REFUSALSCOPE_DATA", raising=False)


def _norm(t: str) -> str:
    return " ".join(t.split())


# --- the real data directory -------------------------------------------------------------------------------


@needs_data
def test_expected_covers_every_registered_name():
    assert set(EXPECTED) == set(DATASETS)


@needs_data
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_named_set_loads_non_empty_and_deduplicated(name):
    ps = load_prompts(name, data_dir=DATA)
    assert len(ps) == EXPECTED[name]
    assert all(t and t == t.strip() for t in ps.texts)
    assert len({_norm(t) for t in ps.texts}) == len(ps.texts)
    # frame rows stay aligned with texts
    assert len(ps.frame) == len(ps.texts)
    assert ps.frame[DATASETS[name].column].astype(str).str.strip().tolist() == ps.texts
    assert ps.name == name and ps.source.endswith(DATASETS[name].file)


@needs_data
def test_named_sets_have_no_raw_duplicates_so_counts_are_file_rows():
    # Backs the exact counts above: dedupe dropped nothing, so the counts are the files' (filtered) row counts.
    import pandas as pd

    adv = pd.read_csv(DATA / "advbench.csv", keep_default_na=False)
    assert len(adv) == 520 and adv["goal"].map(_norm).is_unique
    train = json.loads((DATA / "splits" / "harmful_train.json").read_text())
    assert len(train) == 260 and len({_norm(r["instruction"]) for r in train}) == 260


@needs_data
def test_query_filters_rows():
    safe = load_prompts("xstest_safe", data_dir=DATA)
    unsafe = load_prompts("xstest_unsafe", data_dir=DATA)
    assert set(safe.frame["label"]) == {"safe"} and set(unsafe.frame["label"]) == {"unsafe"}
    assert not set(safe.texts) & set(unsafe.texts)


@needs_data
def test_env_var_replaces_data_dir(monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_DATA", str(DATA))
    ps = load_prompts("harmful_val")
    assert len(ps) == 39 and ps.source == str(DATA / "splits" / "harmful_val.json")


def test_env_var_pointing_nowhere_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSALSCOPE_DATA", str(tmp_path / "nope"))
    with pytest.raises(RefusalScopeError, match="does not exist"):
        load_prompts("harmful_val")


def test_named_set_without_data_dir_and_hub_copy_says_pass_data_dir():
    with pytest.raises(RefusalScopeError, match="--data-dir"):
        load_prompts("harmful_train")


@needs_data
def test_limit_takes_the_first_n():
    full = load_prompts("advbench", data_dir=DATA)
    ps = load_prompts("advbench", data_dir=DATA, limit=5)
    assert ps.texts == full.texts[:5] and len(ps.frame) == 5


@needs_data
def test_check_disjoint_harmful_train_vs_advbench_reports_117():
    train = load_prompts("harmful_train", data_dir=DATA).texts
    adv = load_prompts("advbench", data_dir=DATA).texts
    assert len(overlap(train, adv)) == 117
    with pytest.raises(RefusalScopeError, match=r"\b117\b.*--allow-overlap"):
        check_disjoint(train, adv, what="advbench")
    check_disjoint(train, adv, what="advbench", allow=True)  # no raise


@needs_data
def test_drop_overlap_advbench_keeps_403_in_order():
    train = load_prompts("harmful_train", data_dir=DATA).texts
    adv = load_prompts("advbench", data_dir=DATA)
    kept, dropped = drop_overlap(train, adv)
    assert (len(kept), dropped) == (403, 117)
    train_keys = {_norm(t) for t in train}
    assert kept.texts == [t for t in adv.texts if _norm(t) not in train_keys]  # same relative order
    assert kept.frame["goal"].tolist() == kept.texts
    check_disjoint(train, kept.texts, what="advbench")  # now disjoint


# --- file formats --------------------------------------------------------------------------------------------


def test_txt_one_prompt_a_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  first prompt \n\nsecond prompt\n   \n")
    ps = load_prompts(str(f))
    assert ps.texts == ["first prompt", "second prompt"] and ps.name == "p"


def test_csv_guessed_and_explicit_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,question,note\n1,What is 2+2?,a\n2,Name a colour.,b\n")
    assert load_prompts(str(f)).texts == ["What is 2+2?", "Name a colour."]  # guessed 'question'
    assert load_prompts(str(f), column="note").texts == ["a", "b"]


def test_csv_guess_prefers_instruction_over_other_known_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,instruction\nfrom prompt,from instruction\n")
    assert load_prompts(str(f)).texts == ["from instruction"]


def test_csv_single_unknown_column_is_used(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("whatever\nhello\n")
    assert load_prompts(str(f)).texts == ["hello"]


def test_csv_keeps_na_like_strings(tmp_path):
    # keep_default_na=False: "NA" is a prompt, not a missing value
    f = tmp_path / "p.csv"
    f.write_text("prompt\nNA\nnull\n")
    assert load_prompts(str(f)).texts == ["NA", "null"]


def test_json_list_of_objects_keeps_extra_columns(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"instruction": "a", "category": "x"}, {"instruction": "b", "category": "y"}]))
    ps = load_prompts(str(f))
    assert ps.texts == ["a", "b"] and ps.frame["category"].tolist() == ["x", "y"]


def test_json_list_of_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["one", "two", "one"]))
    assert load_prompts(str(f)).texts == ["one", "two"]


def test_json_object_wrapping_one_list(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"version": 1, "data": [{"prompt": "p1"}, {"prompt": "p2"}]}))
    assert load_prompts(str(f)).texts == ["p1", "p2"]


def test_json_object_with_two_lists_is_ambiguous(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"a": ["x"], "b": ["y"]}))
    with pytest.raises(RefusalScopeError, match="exactly one list"):
        load_prompts(str(f))


def test_jsonl_objects_guessed_and_explicit(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"goal": "g1", "text": "t1"}\n\n{"goal": "g2", "text": "t2"}\n')
    assert load_prompts(str(f)).texts == ["g1", "g2"]  # 'goal' precedes 'text' in the guess order
    assert load_prompts(str(f), column="text").texts == ["t1", "t2"]


def test_uppercase_suffix_is_accepted(tmp_path):
    f = tmp_path / "P.JSON"
    f.write_text(json.dumps(["x"]))
    assert load_prompts(str(f)).texts == ["x"]


# --- errors --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(RefusalScopeError, match="not found.*missing.csv"):
        load_prompts(str(tmp_path / "missing.csv"))


@needs_data
def test_named_set_missing_from_data_dir(tmp_path):
    with pytest.raises(RefusalScopeError, match="not found"):
        load_prompts("advbench", data_dir=tmp_path)


def test_unknown_column_lists_available(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("alpha,beta\n1,2\n")
    with pytest.raises(RefusalScopeError, match=r"'gamma'.*alpha, beta"):
        load_prompts(str(f), column="gamma")


def test_ambiguous_columns_ask_for_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("alpha,beta\n1,2\n")
    with pytest.raises(RefusalScopeError, match=r"alpha, beta.*--column"):
        load_prompts(str(f))


@pytest.mark.parametrize("suffix,body", [(".txt", "\n   \n\n"), (".csv", "prompt\n\n  \n"),
                                         (".json", json.dumps([{"prompt": "  "}, {"prompt": ""}]))])
def test_only_blank_prompts_is_an_empty_set(tmp_path, suffix, body):
    f = tmp_path / f"blank{suffix}"
    f.write_text(body)
    with pytest.raises(RefusalScopeError, match="holds no prompts"):
        load_prompts(str(f))


def test_unknown_dataset_name_lists_known_names():
    with pytest.raises(RefusalScopeError, match=r"unknown dataset 'nonsense'.*advbench"):
        load_prompts("nonsense")


@pytest.mark.parametrize("suffix,body", [(".json", '[{"prompt": "a",'), (".jsonl", '{"prompt": "a"}\n{broken\n')])
def test_unparseable_json(tmp_path, suffix, body):
    f = tmp_path / f"bad{suffix}"
    f.write_text(body)
    with pytest.raises(RefusalScopeError, match="could not parse"):
        load_prompts(str(f))


def test_unparseable_csv(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text('a,b\n"unterminated\n')
    with pytest.raises(RefusalScopeError, match="could not parse"):
        load_prompts(str(f))


def test_unsupported_suffix(tmp_path):
    f = tmp_path / "p.xlsx"
    f.write_text("whatever")
    with pytest.raises(RefusalScopeError, match=r"unsupported dataset format '\.xlsx'.*\.csv"):
        load_prompts(str(f))


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one(tmp_path, limit):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    with pytest.raises(RefusalScopeError, match="--limit must be at least 1"):
        load_prompts(str(f), limit=limit)


# --- dedupe --------------------------------------------------------------------------------------------------


def test_dedupe_keeps_first_and_ignores_whitespace():
    texts = ["a  b", "c", "a b", " a\tb ", "C", "", "   ", "c"]
    assert dedupe(texts) == [0, 1, 4]  # case matters; blanks dropped


def test_load_keeps_first_occurrence_and_its_row(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": "x  y", "id": 1}, {"prompt": "z", "id": 2}, {"prompt": " x y ", "id": 3}]))
    ps = load_prompts(str(f))
    assert ps.texts == ["x  y", "z"] and ps.frame["id"].tolist() == [1, 2]


def test_overlap_is_whitespace_insensitive():
    assert overlap(["a b", "c"], ["a  b", "d", "c "]) == ["a  b", "c "]


# --- split ---------------------------------------------------------------------------------------------------


def test_split_reproducible_and_seed_dependent():
    items = list(range(100))
    assert split(items, seed=3) == split(items, seed=3)
    assert split(items, seed=3) != split(items, seed=4)


def test_split_partitions_exactly_and_respects_fractions():
    items = [f"p{i}" for i in range(100)]
    parts = split(items, (0.7, 0.2, 0.1), seed=1)
    assert [len(p) for p in parts] == [70, 20, 10]
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat)) == 100 and set(flat) == set(items)


@pytest.mark.parametrize("n", [1, 3, 7, 11])
def test_split_partitions_awkward_sizes(n):
    parts = split(list(range(n)), (0.5, 0.5, 0.0), seed=0)
    flat = [x for p in parts for x in p]
    assert sorted(flat) == list(range(n))


def test_split_shuffles():
    assert split(list(range(50)), (1.0,), seed=0)[0] != list(range(50))


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.8, 0.2, 0.1), (1.2, -0.2)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(RefusalScopeError, match="sum to 1"):
        split(list(range(10)), fractions)


# --- regressions: bugs found by these tests and fixed --------------------------------------------------------


def test_jsonl_of_strings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"first"\n"second"\n')
    assert load_prompts(str(f)).texts == ["first", "second"]


def test_jsonl_rows_missing_the_column_are_dropped(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "real"}\n{"other": 1}\n{"prompt": null}\n')
    assert load_prompts(str(f)).texts == ["real"]
