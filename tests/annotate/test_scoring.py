import pandas as pd
import pytest

from refusalscope.annotate.scoring import agreement, jaccard, majority, percent, score


def test_majority_keeps_categories_with_enough_votes():
    assert majority([["a", "b"], ["a"], ["c"]], 2) == {"a"}
    assert majority([["a"], ["b"], []], 2) == frozenset()  # no category reaches 2 votes: None
    assert majority([["a", "a"], ["b"], []], 2) == frozenset()  # a repeated tick is one vote
    assert majority([[], [], ["a"]], 1) == {"a"}


@pytest.mark.parametrize("a,b,expected", [([], [], 1.0), (["x"], [], 0.0), (["x", "y"], ["y", "z"], 1 / 3),
                                          (["x"], ["x"], 1.0)])
def test_jaccard(a, b, expected):
    assert jaccard(a, b) == pytest.approx(expected)


def test_score_by_hand():
    truth = {"f1": {"a"}, "f2": {"a", "b"}, "f3": set(), "f4": {"c"}, "f5": {"a"}, "f6": {"a"}}
    answers = {
        "f1": [["a"], ["a", "b"], ["a"]],   # H = {a}: exact
        "f2": [["a"], ["a"], ["c"]],        # H = {a} vs {a, b}: Jaccard 1/2, overlap
        "f3": [[], [], ["a"]],              # H = {} vs {}: exact
        "f4": [["a"], ["b"], ["a"]],        # H = {a} vs {c}: 0
        "f5": [["a"], ["a"]],               # two annotators only: not scored
        "nope": [["a"], ["a"], ["a"]],      # no activation label: not scored
    }
    out = score(answers, truth, {"f1": "pipeline", "f2": "pipeline", "f3": "random_inactive", "f4": "pipeline"},
                votes=2, min_annotators=3)
    t = out["total"]
    assert t["n"] == 4
    assert t["exact"] == pytest.approx(2 / 4)
    assert t["partial"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert t["overlap"] == pytest.approx(3 / 4)
    assert out["by_source"]["pipeline"]["n"] == 3
    assert out["by_source"]["pipeline"]["exact"] == pytest.approx(1 / 3)
    assert out["by_source"]["random_inactive"]["exact"] == 1.0
    assert list(out["features"]["feature"]) == ["f1", "f2", "f3", "f4"]
    assert percent(t["exact"]) == "50.0%" and percent(None) == "–"


def test_agreement_reads_the_answers_table():
    answers = pd.DataFrame({"annotator": ["a", "b", "c"], "feature": ["f"] * 3,
                            "categories": [["x"], ["x", "y"], []]})
    out = agreement(answers, {"f": "pipeline"}, {"f": {"x", "y"}}, votes=2, min_annotators=3)
    assert out["total"]["n"] == 1 and out["total"]["exact"] == 0.0 and out["total"]["partial"] == 0.5
    assert score({}, {})["total"] == {"n": 0, "exact": None, "partial": None, "overlap": None}
