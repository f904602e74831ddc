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


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_shared_rows_give_the_probabilities_of_one_row_per_set(any_tiny_lm, arch):
    lm, saes, batch, cands, member = _chain(any_tiny_lm, arch)
    ids = lm.refusal_token_ids()
    plain = SetScorer(lm.model, lm.n_layers, batch, ids, saes, cands, batch_size=8, share="none")
    shared = SetScorer(lm.model, lm.n_layers, batch, ids, saes, cands, batch_size=8, share="layers")
    p_plain, f_plain = plain(member, fired=True)
    p_shared, f_shared = shared(member, fired=True)
    assert torch.allclose(p_shared, p_plain, rtol=1e-5, atol=1e-9)
    assert torch.equal(f_shared, f_plain)
    assert len(set(p_plain.tolist())) > 3  # the ablations mattered
    assert plain.layer_rows[0] == plain.layer_rows[1] == member.shape[0] * 3
    assert shared.layer_rows[1] == member.shape[0] * 3
    assert shared.layer_rows[0] < shared.layer_rows[1]  # rows were shared


def test_a_latent_that_never_fires_costs_no_row(tiny_lm):
    lm = tiny_lm
    saes = {layer: random_sae("jumprelu", d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [PROMPT]))
    rec = LatentRecorder(saes, {1: None, 2: None})
    with torch.inference_mode(), hooked(lm.model, rec.hooks(lm.n_layers)):
        lm.model(**batch)
    z1 = rec.records[1][0][0]
    silent = [(1, i) for i in range(64) if (z1[:, i] == 0).all()]
    active = [(1, i) for i in range(64) if (z1[:, i] > 0).any()][:3]
    assert silent and active
    cands = active + silent
    member = membership(cands, [active, active + silent[:1], active + silent, active[:1]])
    scorer = SetScorer(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, cands, share="layers")
    p = scorer(member)
    assert scorer.layer_rows == [1, 4]  # one ablated layer: the forward reached it with one row
    assert p[0] == p[1] == p[2]  # the silent latents change nothing, bit for bit
    assert p[3] != p[0]
