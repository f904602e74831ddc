import random
from collections import Counter

import pandas as pd
import pytest

from refusalscope.annotate.sampling import (
    ACTIVE,
    INACTIVE,
    PIPELINE,
    annotator_order,
    feature_pool,
    sample_features,
    stratified,
)


def _table(rows):
    return pd.DataFrame([{"feature": f, "group": g, "categories": ["c"] * n, "n_categories": n} for f, g, n in rows])


def test_pool_sorts_groups_into_sources_and_pipeline_wins():
    frame = _table([("L1/1", "stage1", 2), ("L1/2", "stage2", 0), ("L1/3", "random_active", 1),
                    ("L1/4", "random_inactive", 0), ("L1/1", "random_active", 2), ("L1/5", "hydra", 3)])
    pool = feature_pool(frame)
    assert pool[PIPELINE] == {"L1/1": 2, "L1/2": 0, "L1/5": 3}
    assert pool[ACTIVE] == {"L1/3": 1}
    assert pool[INACTIVE] == {"L1/4": 0}


def test_pool_reads_list_groups_and_counts_categories_without_n_column():
    frame = pd.DataFrame([{"feature": "L2/7", "group": ["stage2", "stage3"], "categories": ["a", "b"]},
                          {"feature": "L2/8", "group": "random_inactive", "categories": []}])
    pool = feature_pool(frame)
    assert pool[PIPELINE] == {"L2/7": 2} and pool[INACTIVE] == {"L2/8": 0}


def _reference_counts(strata_sizes: dict[int, int], n: int) -> dict[int, int]:
    """Water-filling: each draw goes to the non-exhausted stratum with the fewest drawn, fewest categories first."""
    got = {k: 0 for k in strata_sizes}
    for _ in range(min(n, sum(strata_sizes.values()))):
        open_ = [k for k in sorted(got) if got[k] < strata_sizes[k]]
        k = min(open_, key=lambda s: (got[s], s))
        got[k] += 1
    return got


@pytest.mark.parametrize("sizes,n", [({0: 10, 1: 10, 2: 10}, 7), ({0: 2, 1: 10, 3: 1}, 9), ({1: 4}, 10),
                                     ({0: 5, 1: 5}, 10), ({0: 1, 2: 1, 5: 30}, 0)])
def test_stratified_matches_the_water_filling_reference(sizes, n):
    features = {f"L0/{k * 100 + i}": k for k, m in sizes.items() for i in range(m)}
    out = stratified(features, n, random.Random(3))
    assert len(out) == len(set(out)) == min(n, len(features))
    assert Counter(features[f] for f in out) == Counter({k: v for k, v in _reference_counts(sizes, n).items() if v})


def test_sample_is_seeded_capped_shuffled_and_keeps_sources():
    rows = [(f"L3/{i}", "stage2", i % 4) for i in range(40)] + [(f"L4/{i}", "random_active", 1) for i in range(15)] \
        + [(f"L5/{i}", "random_inactive", 0) for i in range(5)]
    frame = _table(rows)
    a = sample_features(frame, 12, 6, 10, seed=1)
    assert a == sample_features(frame, 12, 6, 10, seed=1)
    assert a != sample_features(frame, 12, 6, 10, seed=2)
    counts = Counter(s for _, s in a)
    assert counts == {PIPELINE: 12, ACTIVE: 6, INACTIVE: 5}  # only 5 inactive exist
    assert len({f for f, _ in a}) == len(a)
    source_of = {f: g for f, g, _ in rows}
    expected = {"stage2": PIPELINE, "random_active": ACTIVE, "random_inactive": INACTIVE}
    assert all(expected[source_of[f]] == s for f, s in a)
    sources = [s for _, s in a]
    assert sources != sorted(sources, key=[PIPELINE, ACTIVE, INACTIVE].index)  # mixed, not grouped by source


def test_annotator_order_is_a_seeded_permutation_per_name():
    items = [f"L0/{i}" for i in range(30)]
    alice = annotator_order(items, 0, "alice")
    assert sorted(alice) == sorted(items)
    assert alice == annotator_order(items, 0, "alice")
    assert alice != annotator_order(items, 0, "bob") and alice != annotator_order(items, 1, "alice")
    assert annotator_order(items, 0, "alice", shared=True) == items
