"""Shared rows (interventions.shared_rows): nested sets scored in one forward that splits only where they differ
in a latent that fired give the probabilities and firing flags of one row per set, with fewer rows computed."""

import pytest
import torch

from refusalscope.interventions.latents import LatentRecorder
from refusalscope.interventions.shared_rows import split_rows
from refusalscope.lm.hooks import hooked
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import membership
from refusalscope.stages.scoring import SetScorer
from refusalscope.stages.stage2 import block_order, chain_sets

from helpers import random_sae

PROMPT = "Tell me how to pick a lock."


def _split_reference(rows, member, fired):
    """Plain loop: sets share a new row iff they shared a row and ablate the same fired latents."""
    keys = [(int(rows[r]), tuple(bool(member[r, j] and fired[rows[r], j]) for j in range(member.shape[1])))
            for r in range(len(rows))]
    return [[keys[a] == keys[b] for b in range(len(keys))] for a in range(len(keys))]


def test_split_rows_matches_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 3, (12,), generator=g)
    member = torch.rand(12, 5, generator=g) > 0.5
    fired = torch.rand(3, 5, generator=g) > 0.4
    new_rows, parent, mask = split_rows(rows, member, fired)
    same = (new_rows[:, None] == new_rows[None, :]).tolist()
    assert same == _split_reference(rows, member, fired)
    assert torch.equal(parent[new_rows], rows)  # a new row comes from its sets' old row
    assert torch.equal(mask[new_rows], member & fired[rows])  # and ablates what they ablate and fired
    assert len(parent) < 12  # something was shared


def _chain(any_tiny_lm, arch):
    lm = any_tiny_lm
    layers = (1, 2, lm.n_layers - 1)
    saes = {layer: random_sae(arch, d=lm.d_model, m=64, layer=layer, seed=layer) for layer in layers}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [PROMPT]))
    cands = [(layer, i) for layer in layers for i in range(0, 64, 2)]
    sets = chain_sets(cands, block_order(cands, seed=0, block=5))
    return lm, saes, batch, cands, membership(cands, sets)


def _expected_rows(cands, member, fired, batch_size):
    """Plain count of the rows shared rows must compute: per chunk and ablated layer, the distinct patterns of
    fired ablated latents (the one-row-per-set flags) at the layers before it."""
    layers = sorted({layer for layer, _ in cands})
    total = 0
    for start in range(0, member.shape[0], batch_size):
        flags = fired[start:start + batch_size]
        for layer in layers:
            cols = [j for j, (ly, _) in enumerate(cands) if ly < layer]
            total += len({tuple(row[cols].tolist()) for row in flags})
    return total


def _scorers(lm, saes, batch, cands, fast=True):
    ids = lm.refusal_token_ids()
    plain = SetScorer(lm.model, lm.n_layers, batch, ids, saes, cands, batch_size=8, share="none", fast=fast)
    shared = SetScorer(lm.model, lm.n_layers, batch, ids, saes, cands, batch_size=8, share="layers", fast=fast)
    return plain, shared


@pytest.mark.parametrize("arch,fast", [("jumprelu", True), ("jumprelu", False), ("topk", True)])
def test_shared_rows_give_the_probabilities_of_one_row_per_set(any_tiny_lm, arch, fast):
    lm, saes, batch, cands, member = _chain(any_tiny_lm, arch)
    plain, shared = _scorers(lm, saes, batch, cands, fast)
    p_plain, f_plain = plain(member, fired=True)
    p_shared, f_shared = shared(member, fired=True)
    assert torch.allclose(p_shared, p_plain, rtol=1e-5, atol=1e-9)
    assert torch.equal(f_shared, f_plain)
    assert len(set(p_plain.tolist())) > 3  # the ablations mattered
    assert plain.layer_rows[0] == plain.layer_rows[1] == member.shape[0] * 3
    assert shared.layer_rows[1] == member.shape[0] * 3
    # exactly as many rows as distinct fired patterns: nothing shared that differs, nothing split that agrees
    assert shared.layer_rows[0] == _expected_rows(cands, member, f_plain, 8) < shared.layer_rows[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_rows_on_cuda_give_the_probabilities_of_one_row_per_set(tiny_dirs):
    from refusalscope.lm.loading import load_model

    lm = load_model(str(tiny_dirs["qwen2"]), device="cuda", dtype="float32")  # "auto" is bf16 on a GPU
    _, saes, batch, cands, member = _chain(lm, "topk")
    saes = {layer: sae.to("cuda") for layer, sae in saes.items()}
    batch = {k: v.to("cuda") for k, v in batch.items()}
    plain, shared = _scorers(lm, saes, batch, cands)
    p_plain, f_plain = plain(member, fired=True)
    p_shared, f_shared = shared(member, fired=True)
    assert torch.allclose(p_shared, p_plain, rtol=1e-4, atol=1e-7)
    assert torch.equal(f_shared, f_plain)
    assert shared.layer_rows[0] < shared.layer_rows[1]


def test_a_latent_that_never_fires_costs_no_row(tiny_lm):
    lm = tiny_lm
    saes = {layer: random_sae("jumprelu", d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [PROMPT]))
    rec = LatentRecorder(saes, {1: None, 2: None})
    with torch.inference_mode(), hooked(lm.model, rec.hooks(lm.n_layers)):
        lm.model(**batch)
    z1, z2 = rec.records[1][0][0], rec.records[2][0][0]
    silent = [(1, i) for i in range(64) if (z1[:, i] == 0).all()]
    active = [(2, i) for i in range(64) if (z2[:, i] > 0).any()][:3]
    assert silent and active
    cands = silent + active
    member = membership(cands, [active, silent[:1] + active, silent + active, active[:1]])
    scorer = SetScorer(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, cands, share="layers")
    p = scorer(member)
    # layer 1 splits nothing (its ablated latents never fire), so layer 2 is reached with one row, not three
    assert scorer.layer_rows == [2, 8]
    assert p[0] == p[1] == p[2]  # the silent latents change nothing, bit for bit
    assert p[3] != p[0]
