"""Stage 3 data: prompt table, last-position SAE activations (vs a one-prompt reference), resumable chunks,
the sparse design matrix in "max" and "positions" modes, column pruning and feature embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_sae

from refusalscope.errors import RefusalScopeError
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentRecorder
from refusalscope.lm.hooks import decoder_layers, hooked
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature
from refusalscope.saes.training.activations import resid_post_batch
from refusalscope.stages import interaction_data as idata
from refusalscope.stages.interaction_data import (PositionedFeature, build_prompt_table, collect_activations, combine,
                                                  column_of, encode_last_positions, feature_embeddings,
                                                  feature_of_column, keep_columns)
from refusalscope.store import RunStore

PROMPTS = ["Write a poem about the sea.", "How do I make a cake?", "Tell me how to pick a lock.",
           "Explain how photosynthesis works in green plants and algae.", "Hi", "Give three tips for staying healthy.",
           "Write a script that deletes files.", "def add(a, b): return a + b"]
N_POS = 4


@pytest.fixture(scope="module")
def saes(tiny_lm):
    """ReLU (with a max_norm that excludes some of the recorded positions), JumpReLU and TopK SAEs at layers 0-2."""
    store, _ = resid_post_batch(tiny_lm, format_chat(tiny_lm.tokenizer, PROMPTS), [0])
    norms = store[0][:, -N_POS:].float().norm(dim=-1)
    max_norm = float(norms.median())
    return {0: random_sae("relu", m=48, layer=0, seed=1, max_norm=max_norm),
            1: random_sae("jumprelu", m=64, layer=1, seed=2, apply_b_dec=True),
            2: random_sae("topk", m=40, layer=2, seed=3)}


def _as_set(coo):
    return {tuple(int(coo[k][i]) for k in ("row", "position", "layer", "latent")): float(coo["value"][i])
            for i in range(len(coo["row"]))}


# --- prompt table ---------------------------------------------------------------------------------------------

def test_prompt_table_balanced_seeded_and_stratified():
    harmful = [f"harmful {i}" for i in range(20)]
    pool = [f"harmless {i}" for i in range(50)]
    t = build_prompt_table(harmful, pool, seed=3)
    assert list(t.columns) == ["prompt", "label", "split"]
    assert (t.label == 1).sum() == (t.label == 0).sum() == 20
    assert t[t.label == 1].prompt.tolist() == harmful
    assert set(t[t.label == 0].prompt) <= set(pool) and t.prompt.is_unique
    counts = t.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", 0): 16, ("train", 1): 16, ("val", 0): 2, ("val", 1): 2, ("test", 0): 2,
                      ("test", 1): 2}
    assert t.equals(build_prompt_table(harmful, pool, seed=3))
    other = build_prompt_table(harmful, pool, seed=4)
    assert not t.equals(other)
    assert set(t[t.label == 0].prompt) != set(other[other.label == 0].prompt)
    with pytest.raises(RefusalScopeError, match="harmless pool holds 10"):
        build_prompt_table(harmful, pool[:10])


# --- activations ----------------------------------------------------------------------------------------------

def test_encode_last_positions_matches_one_prompt_reference(tiny_lm, saes):
    got = encode_last_positions(tiny_lm, saes, PROMPTS, n_positions=N_POS, batch_size=3)
    assert got["value"].dtype == torch.float32 and bool((got["value"] > 0).all())
    ref = {}
    for r, prompt in enumerate(PROMPTS):
        rec = LatentRecorder(saes, {ly: None for ly in saes}, positions=tuple(range(-N_POS, 0)))
        batch = tokenize(tiny_lm.tokenizer, format_chat(tiny_lm.tokenizer, [prompt]))
        with torch.inference_mode(), hooked(tiny_lm.model, hooks_for([rec], tiny_lm.n_layers)):
            tiny_lm.model(**batch, use_cache=False)
        for layer, recs in rec.records.items():
            z = recs[0][0]  # (N_POS, width)
            for p, j in (z > 0).nonzero().tolist():
                ref[(r, p - N_POS, layer, j)] = float(z[p, j])
    got_set = _as_set(got)
    assert set(got_set) == set(ref)
    assert max(abs(got_set[k] - ref[k]) for k in ref) < 1e-5
    # every layer fires somewhere; the max_norm rule blanked some ReLU positions entirely
    assert set(got["layer"].tolist()) == {0, 1, 2}
    relu_positions = {(r, p) for r, p, ly, _ in got_set if ly == 0}
    assert 0 < len(relu_positions) < len(PROMPTS) * N_POS
    # sorted by (row, position, layer, latent)
    keys = list(zip(*(got[k].tolist() for k in ("row", "position", "layer", "latent"))))
    assert keys == sorted(keys)


def test_host_held_saes_bring_each_encoder_over_once_with_the_same_codes(tiny_lm, saes, monkeypatch):
    """SAEs held in bfloat16 (not ready on the model's device) are encoded layer by layer over every batch of the
    call, each layer's encoder converted once, and give the per-batch codes of the same values held in float32."""
    from helpers import bf16_valued

    from refusalscope.saes.placement import hold

    fp32 = {layer: bf16_valued(sae) for layer, sae in saes.items()}
    held = {layer: hold(sae, torch.bfloat16) for layer, sae in fp32.items()}
    conversions = []
    real = idata.encoder_on

    def counting(sae, device):
        out = real(sae, device)
        conversions.append(out is not sae)
        return out

    monkeypatch.setattr(idata, "encoder_on", counting)
    batches = []
    want = encode_last_positions(tiny_lm, fp32, PROMPTS, batch_size=3)
    assert conversions == [False] * (3 * 3)  # float32 on the CPU: no copy, per layer and batch
    conversions.clear()
    got = encode_last_positions(tiny_lm, held, PROMPTS, batch_size=3, on_batch=batches.append)
    assert conversions == [True] * 3 and batches == [len(PROMPTS)]  # one conversion per layer, for all 3 batches
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_encode_stops_after_highest_sae_layer(tiny_lm, saes):
    calls = []
    handle = decoder_layers(tiny_lm.model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        encode_last_positions(tiny_lm, {1: saes[1]}, PROMPTS[:3])
    finally:
        handle.remove()
    assert calls == []


def test_collect_activations_resumes_per_chunk(tiny_lm, saes, tmp_path, monkeypatch):
    import pandas as pd

    table = pd.DataFrame({"prompt": PROMPTS, "label": [1, 0] * 4, "split": ["train"] * 8})
    store = RunStore(tmp_path)
    calls: list[list[str]] = []
    real = idata.encode_last_positions

    def counting(lm, s, prompts, **kw):
        calls.append(list(prompts))
        return real(lm, s, prompts, **kw)

    monkeypatch.setattr(idata, "encode_last_positions", counting)
    kw = dict(chunk_size=3, batch_size=2, progress=False)
    first = collect_activations(tiny_lm, saes, table, store, **kw)
    assert calls == [PROMPTS[0:3], PROMPTS[3:6], PROMPTS[6:8]]
    for c in range(3):
        assert store.exists(f"stage3/activations/chunk_{c:05d}.safetensors")
    whole = encode_last_positions(tiny_lm, saes, PROMPTS, batch_size=2)
    a, b = _as_set(first), _as_set(whole)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-5

    calls.clear()
    again = collect_activations(tiny_lm, saes, table, store, **kw)
    assert calls == []
    assert all(torch.equal(first[k], again[k]) for k in idata.FIELDS)

    store.path("stage3/activations/chunk_00001.safetensors").unlink()
    store.path("stage3/activations/chunk_00002.safetensors").write_bytes(b"not a safetensors file")
    bars = []
    real_tqdm = idata.tqdm
    monkeypatch.setattr(idata, "tqdm", lambda **k: bars.append(k) or real_tqdm(**k))
    resumed = collect_activations(tiny_lm, saes, table, store, **kw)
    assert calls == [PROMPTS[3:6], PROMPTS[6:8]]
    assert bars[0]["initial"] == 3 and bars[0]["total"] == 8 and bars[0]["unit"] == "prompt"
    assert _as_set(resumed).keys() == a.keys()

    calls.clear()  # another SAE set: every chunk is stale
    fewer = collect_activations(tiny_lm, {1: saes[1], 2: saes[2]}, table, store, **kw)
    assert len(calls) == 3 and set(fewer["layer"].tolist()) == {1, 2}
    calls.clear()  # same layers, other weights at one layer: stale too
    collect_activations(tiny_lm, {1: saes[1], 2: random_sae("topk", m=40, layer=2, seed=9)}, table, store, **kw)
    assert len(calls) == 3
    calls.clear()  # another table: only the chunks whose prompts changed
    table2 = table.copy()
    table2.loc[7, "prompt"] = "Write a poem about a cat."
    collect_activations(tiny_lm, {1: saes[1], 2: random_sae("topk", m=40, layer=2, seed=9)}, table2, store, **kw)
    assert calls == [[*PROMPTS[6:7], "Write a poem about a cat."]]


# --- design matrix --------------------------------------------------------------------------------------------

def _random_coo(n_rows=6, widths={1: 5, 3: 4}, seed=0):
    g = np.random.default_rng(seed)
    entries = {}
    for _ in range(60):
        layer = int(g.choice(list(widths)))
        key = (int(g.integers(n_rows)), int(g.integers(-N_POS, 0)), layer, int(g.integers(widths[layer])))
        entries[key] = float(g.random()) + 0.01
    keys = sorted(entries)
    coo = {k: torch.tensor([key[i] for key in keys], dtype=torch.int32)
           for i, k in enumerate(("row", "position", "layer", "latent"))}
    coo["value"] = torch.tensor([entries[k] for k in keys], dtype=torch.float32)
    return coo, entries


def test_combine_max_is_max_over_positions(tiny_lm, saes):
    coo = encode_last_positions(tiny_lm, saes, PROMPTS)
    widths = {ly: s.width for ly, s in saes.items()}
    Xm, cm = combine(coo, len(PROMPTS), saes, widths, mode="max")
    Xp, cp = combine(coo, len(PROMPTS), saes, widths, mode="positions", n_positions=N_POS)
    assert Xm.dtype == np.float32 and Xm.shape == (8, sum(widths.values())) and Xp.shape == (8, Xm.shape[1] * N_POS)
    assert cm == sorted(cm) and cp == sorted(cp)
    assert cm[:2] == [Feature(0, 0), Feature(0, 1)]
    assert cp[:2] == [PositionedFeature(0, 0, -4), PositionedFeature(0, 0, -3)]
    assert [feature_of_column(c) for c in cp[::N_POS]] == cm
    np.testing.assert_array_equal(Xp.toarray().reshape(8, -1, N_POS).max(-1), Xm.toarray())
    assert Xp.nnz == len(coo["row"])
    # a subset of layers keeps only those columns
    X1, c1 = combine(coo, len(PROMPTS), [1], widths, mode="max")
    assert c1 == [Feature(1, j) for j in range(widths[1])]
    np.testing.assert_array_equal(X1.toarray(), Xm.toarray()[:, widths[0]:widths[0] + widths[1]])


def test_combine_values_on_synthetic_coo():
    coo, entries = _random_coo()
    widths = {1: 5, 3: 4}
    Xp, cp = combine(coo, 6, [1, 3], widths, mode="positions")
    Xm, cm = combine(coo, 6, [1, 3], widths, mode="max")
    col_p = {c: i for i, c in enumerate(cp)}
    col_m = {c: i for i, c in enumerate(cm)}
    best = {}
    for (r, p, ly, j), v in entries.items():
        assert Xp[r, col_p[PositionedFeature(ly, j, p)]] == np.float32(v)
        best[(r, ly, j)] = max(best.get((r, ly, j), 0.0), v)
    for (r, ly, j), v in best.items():
        assert Xm[r, col_m[Feature(ly, j)]] == np.float32(v)
    assert Xm.nnz == len(best)
    with pytest.raises(RefusalScopeError):
        combine(coo, 6, [1, 3], {1: 5, 3: 2})


@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("mode", ["max", "positions"])
def test_keep_columns_keeps_always_features_that_never_fire(mode, as_list):
    coo, entries = _random_coo()
    widths = {1: 5, 3: 4}
    X, cols = combine(coo, 6, [1, 3], widths, mode=mode)
    cols = list(cols) if as_list else cols  # combine's ColumnSpace, or any list of columns
    train = np.array([True, True, True, True, False, False])
    fired = {Feature(ly, j) for (r, p, ly, j) in entries if train[r]}
    silent = [Feature(ly, j) for ly in widths for j in range(widths[ly]) if Feature(ly, j) not in fired]
    assert silent, "the synthetic data should leave some feature silent in training"
    some_fired = sorted(fired)[0]
    Xk, kept, report = keep_columns(X, cols, train, always=[str(silent[0]), tuple(some_fired)])
    per = 1 if mode == "max" else N_POS
    kept_feats = [feature_of_column(c) for c in kept]
    assert set(kept_feats) == fired | {silent[0]}
    assert kept_feats.count(silent[0]) == per  # every position of an always feature
    assert Xk.shape == (6, len(kept)) and abs(Xk[:, kept_feats.index(silent[0])]).sum() >= 0
    assert report == {"n_columns_before": X.shape[1], "n_columns_kept": len(kept), "n_always": 2,
                      "n_always_never_fire_in_train": 1, "always_never_fire_in_train": [str(silent[0])]}
    np.testing.assert_array_equal(Xk.toarray(), X.toarray()[:, [cols.index(c) for c in kept]])
    with pytest.raises(RefusalScopeError, match="not columns"):
        keep_columns(X, cols, train, always=[Feature(2, 0)])


def test_column_keys_and_feature_embeddings():
    cols = [PositionedFeature(1, 4, -3), PositionedFeature(1, 4, -1), PositionedFeature(3, 0, -2), Feature(5, 2)]
    assert str(cols[0]) == "L1/4@-3" and column_of("L1/4@-3") == cols[0] and column_of([1, 4, -3]) == cols[0]
    assert column_of("L5/2") == Feature(5, 2) and column_of([5, 2]) == Feature(5, 2)
    assert feature_of_column(cols[1]) == Feature(1, 4) and feature_of_column("L3/0@-2") == Feature(3, 0)
    emb = torch.arange(8.0).reshape(4, 2)
    out = feature_embeddings(emb, cols)
    assert list(out) == [Feature(1, 4), Feature(3, 0), Feature(5, 2)]
    assert torch.equal(out[Feature(1, 4)], torch.tensor([1.0, 2.0]))  # mean of rows 0 and 1
    assert torch.equal(out[Feature(3, 0)], emb[2]) and torch.equal(out[Feature(5, 2)], emb[3])


@pytest.mark.parametrize("mode", ["max", "positions"])
def test_column_space_is_the_explicit_column_list(mode):
    """combine's columns are made on demand (ColumnSpace / ColumnList): the same columns, in the same order, as the
    explicit list; indices, features' columns and the stored tensors agree with it."""
    from refusalscope.stages.interaction_data import ColumnList, ColumnSpace
    from refusalscope.stages.stage3 import _columns_tensors

    widths = {1: 5, 3: 4}
    space = ColumnSpace([1, 3], widths, mode, N_POS)
    explicit = ([Feature(ly, j) for ly in (1, 3) for j in range(widths[ly])] if mode == "max" else
                [PositionedFeature(ly, j, p) for ly in (1, 3) for j in range(widths[ly]) for p in range(-N_POS, 0)])
    assert len(space) == len(explicit) and list(space) == explicit and space == explicit and explicit == space
    assert space[0] == explicit[0] and space[-1] == explicit[-1] and space[3:11:2] == explicit[3:11:2]
    assert all(space.index(c) == i for i, c in enumerate(explicit)) and space.index(str(explicit[7])) == 7
    for f in (Feature(1, 0), Feature(3, 3)):
        assert [explicit[i] for i in space.columns_of(f)] == [c for c in explicit if feature_of_column(c) == f]
    assert space.columns_of(Feature(2, 0)) is None and space.columns_of(Feature(3, 4)) is None
    with pytest.raises(ValueError):
        space.index(Feature(2, 0))
    wrong = [Feature(2, 0), Feature(1, 5), PositionedFeature(1, 0, 0), PositionedFeature(1, 0, -N_POS - 1), "x"]
    wrong += [PositionedFeature(1, 0, -1)] if mode == "max" else [Feature(1, 0)]
    for col in wrong:  # what the list would not find
        assert col not in space and col not in explicit
        with pytest.raises(ValueError):
            space.index(col)
    last = len(explicit) - 1
    assert space.index(explicit[-1], -1) == last and space.index(tuple(explicit[2]), 1, 3) == 2
    with pytest.raises(ValueError):
        space.index(explicit[2], 0, 2)
    with pytest.raises(IndexError):
        space.take([len(space)])
    with pytest.raises(TypeError):
        space.take(np.ones(len(space), dtype=bool))
    pick = np.array([len(explicit) - 1, 0, 5])
    got = space.take(pick)
    assert isinstance(got, ColumnList) and list(got) == [explicit[i] for i in pick] and got[1:] == list(got)[1:]
    want = _columns_tensors([explicit[i] for i in pick])
    assert all(torch.equal(_columns_tensors(got)[k], want[k]) for k in want)


@pytest.mark.parametrize("mode", ["max", "positions"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_feature_tables_match_the_one_feature_at_a_time_forms(mode, shuffled):
    """feature_embeddings (means grouped by column count) and feature_max against one feature at a time: the same
    features in the same order (of their first column) and bit-identical values, for sorted (combine's) and
    shuffled columns; lookups by (layer, latent) only."""
    from refusalscope.stages.interaction_data import ColumnSpace, feature_embeddings_reference, feature_max

    g = torch.Generator().manual_seed(0)
    space = ColumnSpace([2, 5, 7], {2: 50, 5: 30, 7: 40}, mode, N_POS)
    idx = torch.randperm(len(space), generator=g)[:len(space) // 3]
    idx = idx if shuffled else idx.sort().values
    cols = space.take(idx.numpy())
    emb = torch.randn(len(cols), 6, generator=g)
    got, want = feature_embeddings(emb, cols), feature_embeddings_reference(emb, list(cols))
    assert list(got) == list(want) and len(got) == len(want)
    assert all(torch.equal(got[f], want[f]) for f in want)
    w = torch.rand(len(cols), generator=g).numpy()
    best: dict = {}
    for c, x in zip(cols, w.tolist()):
        best[feature_of_column(c)] = max(best.get(feature_of_column(c), 0.0), x)
    top = feature_max(w, cols)
    assert list(top) == list(best) and dict(top.items()) == best
    missing = next(Feature(5, j) for j in range(30) if Feature(5, j) not in best)
    for table in (got, top):
        assert missing not in table and Feature(3, 0) not in table and (5, -1) not in table and "L5/0" not in table
        with pytest.raises(KeyError):
            table[missing]
    assert feature_embeddings(emb[:0], []) == {} and feature_max(w[:0], []) == {}
    with pytest.raises(RefusalScopeError, match="once"):  # a table holds each feature once
        type(top)(np.array([2, 2]), np.array([1, 1]), np.zeros(2))
