"""Which features the annotators see (paper, appendix on the human evaluation of the taxonomy, Fig. 7).

Pipeline features are drawn stratified by the number of CoCoNot categories they fire on, random activating and
random non-activating features are added as controls, and the whole list is shuffled so the annotators cannot tell
the source. How the strata share the sample and the sizes are our choice (round robin, options of ``annotate``).
Pure functions over the taxonomy's ``features.parquet`` table; the app stores the result once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import pandas as pd

PIPELINE, ACTIVE, INACTIVE = "pipeline", "random_active", "random_inactive"
SOURCES = (PIPELINE, ACTIVE, INACTIVE)


def _groups(value) -> list[str]:
    """A row's group(s): a string, or a list when one row carries several."""
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def feature_pool(features: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``features.parquet`` → {source: {feature: number of categories it fires on}}.

    Rows of the groups ``random_active`` / ``random_inactive`` are the controls; every other group (stage1, stage2,
    stage3, hydra, ...) is a pipeline feature. A feature that is both counts as pipeline (our choice: the controls
    stand for features the pipeline did not find)."""
    for col in ("feature", "group"):
        if col not in features.columns:
            raise ValueError(f"features table lacks the column {col!r}")
    pool: dict[str, dict[str, int]] = {s: {} for s in SOURCES}
    for row in features.itertuples(index=False):
        feature = str(row.feature)
        n = _n_categories(row)
        for group in _groups(row.group):
            source = group if group in (ACTIVE, INACTIVE) else PIPELINE
            pool[source][feature] = n
    for source in (ACTIVE, INACTIVE):
        for feature in list(pool[source]):
            if feature in pool[PIPELINE]:
                del pool[source][feature]
    if set(pool[ACTIVE]) & set(pool[INACTIVE]):  # a feature can't be both; keep it as active
        for feature in set(pool[ACTIVE]) & set(pool[INACTIVE]):
            del pool[INACTIVE][feature]
    return pool


def _n_categories(row) -> int:
    n = getattr(row, "n_categories", None)
    if n is not None and not pd.isna(n):
        return int(n)
    cats = getattr(row, "categories", None)
    return len(list(cats)) if cats is not None else 0


def stratified(features: dict[str, int], n: int, rng: random.Random) -> list[str]:
    """``n`` features spread as evenly as the strata allow over the strata of equal category count: round robin over
    the strata (fewest categories first), each stratum in a random order; a used-up stratum drops out."""
    strata: dict[int, list[str]] = {}
    for feature in sorted(features):
        strata.setdefault(features[feature], []).append(feature)
    queues = []
    for key in sorted(strata):
        items = strata[key][:]
        rng.shuffle(items)
        queues.append(items)
    out: list[str] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def sample_features(features: pd.DataFrame, n_pipeline: int, n_active: int, n_inactive: int,
                    seed: int = 0) -> list[tuple[str, str]]:
    """The annotation sample as [(feature, source)], shuffled with ``seed``; each part is capped at what the table
    holds. Pipeline features are stratified by category count; the controls are drawn uniformly."""
    pool = feature_pool(features)
    rng = random.Random(seed)
    chosen = [(f, PIPELINE) for f in stratified(pool[PIPELINE], n_pipeline, rng)]
    for source, n in ((ACTIVE, n_active), (INACTIVE, n_inactive)):
        candidates = sorted(pool[source])
        chosen += [(f, source) for f in rng.sample(candidates, min(n, len(candidates)))]
    rng.shuffle(chosen)
    return chosen


def annotator_order(features: Sequence[str], seed: int, name: str, shared: bool = False) -> list[str]:
    """The order one annotator sees the sample in: our choice, a permutation seeded by (seed, name), so order effects
    average out over annotators and a returning annotator gets the same order; ``shared`` keeps the stored order."""
    order = list(features)
    if not shared:
        random.Random(f"{seed}:{name}").shuffle(order)
    return order


def count_by(items: Iterable[tuple[str, str]]) -> dict[str, int]:
    out = {s: 0 for s in SOURCES}
    for _, source in items:
        out[source] = out.get(source, 0) + 1
    return out
