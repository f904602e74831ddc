"""Stage 3: the rankings (pure), the causal link, and Stage 3 end to end on a tiny model (resumable, no retrain)."""

import torch

from refusalscope.saes.features import Feature
from refusalscope.stages.stage3 import rank_by_fm, rank_by_probe


def test_rank_by_fm_orders_by_cosine_to_the_anchors():
    a, b = Feature(3, 1), Feature(4, 2)
    near_a, near_b, far, unknown = Feature(5, 7), Feature(6, 8), Feature(2, 9), Feature(7, 7)
    emb = {a: torch.tensor([1.0, 0.0, 0.0]), b: torch.tensor([0.0, 1.0, 0.0]),
           near_a: torch.tensor([0.9, 0.1, 0.0]), near_b: torch.tensor([0.1, 0.5, 0.0]),
           far: torch.tensor([0.0, 0.0, 1.0])}
    ranked = rank_by_fm([far, near_b, near_a, unknown], [a, b], emb, "max")
    assert [f for f, _ in ranked] == [near_a, near_b, far]  # unknown has no embedding: left out
    assert abs(ranked[0][1] - 0.9 / (0.82 ** 0.5)) < 1e-9
    # mean: near_b scores (cos to a + cos to b) / 2
    mean = dict(rank_by_fm([near_a, near_b], [a, b], emb, "mean"))
    cb = torch.nn.functional.normalize(emb[near_b], dim=0)
    assert abs(mean[near_b] - float(cb[0] + cb[1]) / 2) < 1e-6
    assert rank_by_fm([near_a], [], emb) == []


def test_rank_by_probe_orders_by_weight_and_breaks_ties_by_feature():
    w = {Feature(3, 1): 0.5, Feature(2, 1): 0.5, Feature(4, 4): 2.0}
    ranked = rank_by_probe([Feature(3, 1), Feature(2, 1), Feature(4, 4), Feature(9, 9)], w)
    assert [f for f, _ in ranked] == [Feature(4, 4), Feature(2, 1), Feature(3, 1)]


def test_rankings_read_a_feature_table_as_they_read_a_dict():
    """A loaded run's models are FeatureTables (one tensor or array, features found by key): both rankings give the
    dict's results, with candidates outside the table, duplicates and ties."""
    import numpy as np

    from refusalscope.stages.interaction_data import FeatureTable

    g = torch.Generator().manual_seed(0)
    feats = [Feature(ly, j) for ly in (2, 5, 9) for j in range(0, 40, 3)]
    feats = [feats[i] for i in torch.randperm(len(feats), generator=g).tolist()]  # table order is not key order
    emb = torch.randn(len(feats), 4, generator=g)
    w = torch.randint(0, 4, (len(feats),), generator=g).double().numpy()  # many ties
    layer, latent = np.array([f.layer for f in feats]), np.array([f.latent for f in feats])
    table, weights = FeatureTable(layer, latent, emb), FeatureTable(layer, latent, w)
    as_dict = {f: emb[i] for i, f in enumerate(feats)}
    w_dict = {f: float(w[i]) for i, f in enumerate(feats)}
    cands = [Feature(9, 3), Feature(2, 1), Feature(5, 6), Feature(2, 0), Feature(7, 0), Feature(5, 39), Feature(2, 3),
             Feature(9, 3), Feature(5, 40)]
    anchors = [Feature(2, 6), Feature(4, 4), Feature(9, 39)]
    for score in ("max", "mean"):
        assert rank_by_fm(cands, anchors, table, score) == rank_by_fm(cands, anchors, as_dict, score)
    assert rank_by_probe(cands, weights) == rank_by_probe(cands, w_dict)
    assert len(rank_by_probe(cands, weights)) == 6  # (7, 0), (5, 40), (2, 1) have none; (9, 3) twice
    assert rank_by_fm(cands, [Feature(7, 0)], table) == []
    # lookups by (layer, latent) only: what a dict of Features would not find is not found
    from refusalscope.stages.interaction_data import PositionedFeature

    for other in (PositionedFeature(2, 0, -1), "20", Feature(2, -1), Feature(2, 1)):
        assert other not in table
    assert table == as_dict and table != {**as_dict, feats[0]: emb[0] + 1} and weights == w_dict


def test_scale_columns_divides_by_the_training_max():
    import numpy as np
    import scipy.sparse as sp

    from refusalscope.stages.stage3 import scale_columns

    X = sp.csr_matrix(np.array([[2.0, 0.0, 5.0], [4.0, 0.0, 0.0], [8.0, 3.0, 1.0]], dtype=np.float32))
    train = np.array([True, True, False])
    scaled = scale_columns(X, train).toarray()
    np.testing.assert_allclose(scaled, [[0.5, 0.0, 1.0], [1.0, 0.0, 0.0], [2.0, 3.0, 0.2]])
    assert scale_columns(X, train, "none") is X
