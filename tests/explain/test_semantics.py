"""Feature-semantics tables: content words (Table 4) and the keyword themes (Tables 7/8/10/11)."""

from __future__ import annotations

import pandas as pd
import pytest

from refusalscope.errors import RefusalScopeError
from refusalscope.explain.semantics import (
    OTHER,
    assign_themes,
    content_words,
    keyword_pattern,
    load_themes,
    theme_hits,
    theme_table,
    top_terms,
)


def test_content_words_drop_stop_words_and_boilerplate():
    assert content_words("References to harmful instructions and the word 'bomb'.") == \
        ["harmful", "instructions", "bomb"]
    assert content_words('fires on "sorry", "can\'t", "\\n" (local contexts)') == ["sorry", "can't"]


def test_top_terms_count_each_explanation_once():
    texts = ["weapons weapons weapons", "weapons and bombs", "cooking recipes", "bombs"]
    t = top_terms(texts, n=2)
    assert list(t.columns) == ["term", "count", "share"]
    assert t.to_dict("records") == [{"term": "bombs", "count": 2, "share": 0.5},
                                    {"term": "weapons", "count": 2, "share": 0.5}]  # ties: alphabetical
    assert top_terms([], 5).empty


@pytest.mark.parametrize("keyword,text,hit", [
    ("harm", "causing harm to people", True),
    ("harm", "harms", True),
    ("harm", "harmless fun", False),
    ("harm", "pharmacy", False),
    ("apolog*", "an apology", True),
    ("apolog*", "apologizes", True),
    ("how to", "how   to build", True),
    ("how to", "how do I", False),
    ("can't", "i can\u2019t do it", True),
    ("line break*", "line breaks", True),
])
def test_keyword_patterns(keyword, text, hit):
    assert bool(keyword_pattern(keyword).search(text.translate({0x2019: "'"}))) is hit


def test_default_themes_load_and_assign():
    themes = load_themes()
    assert {"refusal", "harm", "violence-weapons", "cyber", "chat-roles"} <= set(themes)
    texts = {"L1/1": "apologies and refusals to help", "L1/2": "weapons, bombs and explosive devices",
             "L1/3": "harmful weapons", "L1/4": "baking bread",
             "L1/5": 'fires on "sorry", "assistant" (local contexts)'}
    a = assign_themes(texts, themes).set_index("feature")
    assert a.loc["L1/1", "theme"] == "refusal"
    assert a.loc["L1/2", "theme"] == "violence-weapons"
    assert list(a.loc["L1/3", "themes"]) == ["harm", "violence-weapons"]  # file order
    assert a.loc["L1/3", "theme"] == "harm"  # one hit each: the first theme in the file wins
    assert a.loc["L1/4", "theme"] == OTHER and list(a.loc["L1/4", "themes"]) == [OTHER]
    assert set(a.loc["L1/5", "themes"]) == {"refusal", "chat-roles"}


def test_theme_table_counts_every_matching_theme(tmp_path):
    f = tmp_path / "themes.toml"
    f.write_text('[themes]\nfood = ["bread", "cake*"]\nweapons = ["bomb*", "gun"]\n')
    themes = load_themes(f)
    assert themes == {"food": ["bread", "cake*"], "weapons": ["bomb*", "gun"]}
    assert theme_hits("a gun and bombs near a cake", themes) == {"weapons": 2, "food": 1}
    a = assign_themes({"L0/1": "bread", "L0/2": "bomb cake", "L0/3": "guns", "L0/4": "poetry"}, themes)
    t = theme_table(a, list(themes), n_examples=1).set_index("theme")
    assert list(t.index) == ["food", "weapons", OTHER]
    assert t.loc["food", "n_features"] == 2 and t.loc["food", "n_primary"] == 2
    assert t.loc["weapons", "n_features"] == 2 and t.loc["weapons", "n_primary"] == 1
    assert t.loc["weapons", "examples"] == ["L0/3"]  # primary-theme features first
    assert t.loc[OTHER, "share"] == pytest.approx(0.25)
    assert isinstance(a, pd.DataFrame) and list(a.columns) == ["feature", "theme", "themes"]


@pytest.mark.parametrize("text,match", [
    ("themes = 3", "needs a \\[themes\\] table"),
    ("[themes]\nx = []", "non-empty list"),
    ("[themes]\nother = [\"a\"]", "reserved"),
    ("[themes\n", "not valid TOML"),
])
def test_bad_themes_files(tmp_path, text, match):
    f = tmp_path / "t.toml"
    f.write_text(text)
    with pytest.raises(RefusalScopeError, match=match):
        load_themes(f)
    with pytest.raises(RefusalScopeError, match="not found"):
        load_themes(tmp_path / "missing.toml")
