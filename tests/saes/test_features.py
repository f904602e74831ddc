"""The Feature type: one string form, one parser, JSON as [layer, latent]."""

import json

import pytest

from refusalscope.saes.features import Feature, feature_strings, features_of


def test_feature_string_form_round_trips():
    f = Feature(17, 1204)
    assert str(f) == "L17/1204" and Feature.parse("L17/1204") == f and Feature.parse(" L17/1204 ") == f
    assert features_of(["L3/4", [3, 4], (3, 4), Feature(3, 4)]) == [Feature(3, 4)] * 4
    assert json.loads(json.dumps([f])) == [[17, 1204]] and Feature.of(json.loads(json.dumps(f))) == f
    assert feature_strings([(1, 2), "L3/4"]) == ["L1/2", "L3/4"]
    assert sorted([Feature(2, 1), Feature(1, 9)]) == [Feature(1, 9), Feature(2, 1)]


@pytest.mark.parametrize("bad", ["17/1204", "L17", "L17/x", "layer 17 latent 3", ""])
def test_feature_parse_rejects_other_forms(bad):
    with pytest.raises(ValueError, match="expected e.g. 'L17/1204'"):
        Feature.parse(bad)


def test_active_features_is_the_max_over_positions_of_each_layers_encode(tiny_lm):
    """Without an ablation, each layer's latents see the clean resid_post: the reference encodes it directly."""
    import torch

    from helpers import random_sae
    from refusalscope.lm.prompts import format_chat
    from refusalscope.saes.features import active_features
    from refusalscope.saes.training.activations import resid_post_batch

    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    prompt = "Tell me how to pick a lock."
    store, _ = resid_post_batch(tiny_lm, format_chat(tiny_lm.tokenizer, [prompt]), [1, 2])
    ref = {}
    for layer, sae in saes.items():
        zmax = sae.encode(store[layer][0].float()).amax(dim=0)
        ref.update({Feature(layer, i): float(zmax[i]) for i in range(sae.width) if zmax[i] > 0})
    got = active_features(tiny_lm, prompt, saes)
    assert list(got) == list(ref) and 0 < len(got) < 128  # the firing ones only, in (layer, latent) order
    assert torch.allclose(torch.tensor(list(got.values())), torch.tensor(list(ref.values())))
    some = [Feature(1, 3), Feature(2, 60), *list(ref)[:3]]
    chosen = active_features(tiny_lm, prompt, saes, some)
    assert set(chosen) == set(some) and all(chosen[f] == pytest.approx(ref.get(f, 0.0), abs=1e-6) for f in some)
