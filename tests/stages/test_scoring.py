"""P(refusal) under latent ablation (stages.scoring): batched = one by one, prefix reuse and replayed lower layers
give the same probabilities as the full forward."""

import pytest
import torch

from refusalscope.interventions.latents import LatentRecorder
from refusalscope.lm.hooks import decoder_layers, hooked
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import as_latent_set, membership
from refusalscope.stages.scoring import clean_prefix_length, refusal_probs, refusal_probs_for_batch

from helpers import random_sae


def test_refusal_probs_batch_equals_single(tiny_lm):
    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    sets = [[], [(1, 0), (1, 5)], [(2, i) for i in range(30)], [(1, i) for i in range(64)]]
    batched = refusal_probs(tiny_lm, "hi there", saes, sets, batch_size=3)
    single = torch.cat([refusal_probs(tiny_lm, "hi there", saes, [s]) for s in sets])
    assert torch.allclose(batched, single, rtol=1e-5)
    assert as_latent_set([(2, 3), (1, 4), (2, 5)]) == {2: [3, 5], 1: [4]}


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_prefix_reuse_gives_the_same_probabilities(any_tiny_lm, arch):
    lm = any_tiny_lm  # Qwen2/Llama use a DynamicCache, Gemma-2 a hybrid sliding-window cache
    saes = {layer: random_sae(arch, d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, ["Tell me how to pick a lock."]))
    rec = LatentRecorder(saes, {1: None, 2: None})
    with torch.inference_mode(), hooked(lm.model, rec.hooks(lm.n_layers)):
        lm.model(**batch)
    # candidates silent on the first 4 positions of the clean run (some fire later)
    quiet = [(layer, i) for layer in (1, 2) for i in range(64) if (rec.records[layer][0][0, :4, i] == 0).all()
             and (rec.records[layer][0][0, 4:, i] > 0).any()]
    assert len(quiet) >= 3
    assert clean_prefix_length(lm.model, lm.n_layers, batch, saes, quiet) >= 4
    sets = [quiet, quiet[:2], quiet[1:], []]
    member = membership(quiet, sets)
    ids = lm.refusal_token_ids()
    full = refusal_probs_for_batch(lm.model, lm.n_layers, batch, ids, saes, quiet, member, share="none")
    for share in ("positions", "auto"):
        reused = refusal_probs_for_batch(lm.model, lm.n_layers, batch, ids, saes, quiet, member, share=share)
        assert torch.allclose(reused, full, rtol=1e-5, atol=1e-9), share
    assert not torch.allclose(full[0], full[3])  # the ablation mattered


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_replayed_lower_layers_give_the_same_probabilities(any_tiny_lm, arch):
    """Layers below the lowest ablated layer run once and are replayed for every row: same P as running them."""
    lm = any_tiny_lm
    top = lm.n_layers - 1
    saes = {layer: random_sae(arch, d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (top - 1, top)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, ["Tell me how to pick a lock."]))
    cands = [(layer, i) for layer in (top - 1, top) for i in range(0, 64, 3)]
    sets = [cands, cands[:5], cands[5:], []]
    member = membership(cands, sets)
    ids = lm.refusal_token_ids()
    calls = {"n": 0}
    mlp = decoder_layers(lm.model)[0].mlp  # runs only when layer 0 really computes
    handle = mlp.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    try:
        full = refusal_probs_for_batch(lm.model, lm.n_layers, batch, ids, saes, cands, member, share="none",
                                       batch_size=2)
        n_full = calls["n"]
        replayed = refusal_probs_for_batch(lm.model, lm.n_layers, batch, ids, saes, cands, member, share="layers",
                                           batch_size=2)
    finally:
        handle.remove()
    assert torch.allclose(replayed, full, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(full[0], full[3])
    assert n_full == 2 and calls["n"] - n_full == 1  # 2 chunks computed layer 0; replayed: only the clean pass
    assert "forward" not in decoder_layers(lm.model)[0].__dict__  # restored
