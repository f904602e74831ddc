"""Agreement of the annotators with the activation-based labels (paper, Fig. 7: three annotators, majority vote).

A feature's human label is the set of categories that at least ``votes`` of its annotators ticked ("None" is the
empty set). It is compared with the taxonomy's activation-based label, the categories on whose prompts the feature
fires:
- exact: the two sets are equal (both empty counts: a feature that fires on no category, judged "None");
- partial: their Jaccard index |H ∩ A| / |H ∪ A| (1 when both are empty), averaged over features;
- overlap: the sets share a category, or both are empty.
Pure functions; the app and the report both call ``agreement``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

DEFINITIONS = {
    "exact": "the majority label set equals the activation-based set (both empty counts as equal)",
    "partial": "Jaccard index |H ∩ A| / |H ∪ A| of the majority set H and the activation-based set A (1 when both are "
               "empty), averaged over the scored features",
    "overlap": "H and A share at least one category, or both are empty",
}


def majority(label_sets: Sequence[Iterable[str]], votes: int) -> frozenset[str]:
    """Categories ticked by at least ``votes`` of the annotators (our reading of "majority vote, ≥ 2 of 3")."""
    counts = Counter(c for labels in label_sets for c in set(labels))
    return frozenset(c for c, n in counts.items() if n >= votes)


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    a, b = set(a), set(b)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def score(answers: Mapping[str, Sequence[Iterable[str]]], truth: Mapping[str, Iterable[str]],
          sources: Mapping[str, str] | None = None, *, votes: int = 2, min_annotators: int = 3) -> dict:
    """Per-feature comparison and totals.

    ``answers``: feature → each annotator's ticked categories; ``truth``: feature → activation-based categories;
    ``sources``: feature → sample source (for the per-source breakdown). Features answered by fewer than
    ``min_annotators`` annotators, or without an activation-based label, are not scored.
    Returns {"features": DataFrame, "total": {...}, "by_source": {source: {...}}}.
    """
    rows = []
    for feature, label_sets in sorted(answers.items()):
        if len(label_sets) < min_annotators or feature not in truth:
            continue
        human, act = majority(label_sets, votes), frozenset(truth[feature])
        rows.append({"feature": feature, "source": (sources or {}).get(feature, ""), "n_annotators": len(label_sets),
                     "majority": sorted(human), "activation": sorted(act), "exact": human == act,
                     "partial": jaccard(human, act), "overlap": bool(human & act) or (not human and not act)})
    frame = pd.DataFrame(rows, columns=["feature", "source", "n_annotators", "majority", "activation", "exact",
                                        "partial", "overlap"])
    by_source = {str(s): _totals(g) for s, g in frame.groupby("source")} if len(frame) else {}
    return {"features": frame, "total": _totals(frame), "by_source": by_source,
            "votes": votes, "min_annotators": min_annotators, "n_answered": len(answers)}


def answers_by_feature(answers: pd.DataFrame) -> dict[str, list[list[str]]]:
    """feature → each annotator's categories, from the store's answers table."""
    out: dict[str, list[list[str]]] = {}
    for feature, cats in zip(answers["feature"], answers["categories"]):
        out.setdefault(str(feature), []).append(list(cats))
    return out


def agreement(answers: pd.DataFrame, sources: Mapping[str, str], truth: Mapping[str, Iterable[str]], *,
              votes: int = 2, min_annotators: int = 3) -> dict:
    """``score`` of a store's answers table (``AnnotationStore.answers``): what the app and the report show."""
    return score(answers_by_feature(answers), truth, sources, votes=votes, min_annotators=min_annotators)


def _totals(frame: pd.DataFrame) -> dict:
    n = len(frame)
    if not n:
        return {"n": 0, "exact": None, "partial": None, "overlap": None}
    return {"n": n, "exact": float(frame["exact"].mean()), "partial": float(frame["partial"].mean()),
            "overlap": float(frame["overlap"].mean())}


def percent(value: float | None) -> str:
    """The page's form of an accuracy: '50.0%', or '–' when nothing is scored yet."""
    return "–" if value is None else f"{100 * value:.1f}%"
