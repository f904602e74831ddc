"""Top-activating contexts: the batched one-pass form equals the plain reference (each text alone, full encodes)
for every SAE architecture, over several layers at once, whatever the batch size."""

from __future__ import annotations

import pytest

from helpers import random_sae
from refusalscope.errors import RefusalScopeError
from refusalscope.explain.local import reference_top_contexts, top_contexts
from refusalscope.lm.hooks import decoder_layers
from refusalscope.saes.features import Feature

PROMPTS = ["Tell me how to pick a lock.", "Write a poem about the sea.", "How do I make a cake?",
           "Explain how photosynthesis works.", "Give three tips for staying healthy.",
           "Write a script that deletes files.", "The quick brown fox jumps over the lazy dog.", "Hi"]


def _saes(tiny_lm, arch):
    return {layer: random_sae(arch, d=tiny_lm.d_model, m=40, layer=layer, seed=10 + layer) for layer in (0, 1, 2)}


def _features():
    return [Feature(layer, i) for layer in (0, 2) for i in range(0, 40, 3)] + [Feature(1, 5)]


def _same(fast, ref):
    assert set(fast) == set(ref)
    for f in ref:
        assert len(fast[f]) == len(ref[f]), f
        for a, b in zip(fast[f], ref[f]):
            assert (a.prompt, a.tokens, a.top_index, a.top_token) == (b.prompt, b.tokens, b.top_index, b.top_token)
            assert a.activations == pytest.approx(b.activations, abs=1e-4)
            assert a.top_value == pytest.approx(b.top_value, abs=1e-4)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_pass_equals_the_reference(tiny_lm, arch, batch_size):
    saes, features = _saes(tiny_lm, arch), _features()
    ref = reference_top_contexts(tiny_lm, saes, features, PROMPTS, n=3, before=4, after=2)
    got = top_contexts(tiny_lm, saes, features, PROMPTS, n=3, before=4, after=2, batch_size=batch_size,
                       progress=False)
    _same(got.contexts, ref)
    # a real check: several features fire, some on more than one text
    assert sum(bool(v) for v in ref.values()) >= 5 and max(len(v) for v in ref.values()) >= 2
    assert got.n_texts == len(PROMPTS) and got.n_tokens > len(PROMPTS) * 5 and got.seconds > 0


def test_contexts_are_top_n_distinct_texts_with_the_top_token_at_its_index(tiny_lm):
    saes = _saes(tiny_lm, "relu")
    got = top_contexts(tiny_lm, saes, _features(), PROMPTS, n=2, before=3, after=1, batch_size=4,
                       progress=False).contexts
    for f, contexts in got.items():
        assert len(contexts) <= 2
        assert len({c.prompt for c in contexts}) == len(contexts)
        values = [c.top_value for c in contexts]
        assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
        for c in contexts:
            assert c.tokens[c.top_index] == c.top_token and c.activations[c.top_index] == c.top_value
            assert c.top_value == max(c.activations)
            assert c.top_index <= 3 and len(c.tokens) - c.top_index - 1 <= 1  # the window


def test_raw_text_mode_and_zero_width_window(tiny_lm):
    saes, features = _saes(tiny_lm, "jumprelu"), _features()
    ref = reference_top_contexts(tiny_lm, saes, features, PROMPTS, n=2, before=0, after=0, chat=False)
    got = top_contexts(tiny_lm, saes, features, PROMPTS, n=2, before=0, after=0, batch_size=4, chat=False,
                       progress=False)
    _same(got.contexts, ref)
    assert all(len(c.tokens) == 1 for cs in got.contexts.values() for c in cs)


def test_the_pass_stops_after_the_last_layer_it_needs(tiny_lm):
    saes = {layer: random_sae("relu", d=tiny_lm.d_model, m=16, layer=layer) for layer in (0, 1, 3)}
    calls = []
    handle = decoder_layers(tiny_lm.model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        top_contexts(tiny_lm, saes, [Feature(0, 1), Feature(1, 2)], PROMPTS[:4], batch_size=2, progress=False)
        assert calls == []
        top_contexts(tiny_lm, saes, [Feature(3, 1)], PROMPTS[:4], batch_size=2, progress=False)
        assert len(calls) == 2
    finally:
        handle.remove()


def test_bad_input(tiny_lm):
    saes = _saes(tiny_lm, "relu")
    with pytest.raises(RefusalScopeError, match=r"no SAE loaded for layer\(s\) \[3\]"):
        top_contexts(tiny_lm, saes, [Feature(3, 0)], PROMPTS, progress=False)
    with pytest.raises(RefusalScopeError, match="out of range"):
        top_contexts(tiny_lm, saes, [Feature(1, 99)], PROMPTS, progress=False)
    with pytest.raises(RefusalScopeError, match="corpus is empty"):
        top_contexts(tiny_lm, saes, [Feature(1, 0)], [], progress=False)


def test_the_shared_template_prefix_is_neither_searched_nor_shown(tiny_lm):
    from refusalscope.explain.local import shared_prefix_length
    from refusalscope.lm.prompts import format_chat

    n = shared_prefix_length(tiny_lm.tokenizer, chat=True)
    ids = tiny_lm.tokenizer(format_chat(tiny_lm.tokenizer, ["Tell me"])[0], add_special_tokens=False)["input_ids"]
    assert tiny_lm.tokenizer.decode(ids[n:]).startswith("Tell me")  # the prefix ends where the user's text begins
    assert n > 0 and shared_prefix_length(tiny_lm.tokenizer, chat=False) == 0
    saes = _saes(tiny_lm, "relu")
    got = top_contexts(tiny_lm, saes, _features(), PROMPTS, n=8, before=50, after=50, batch_size=4, progress=False)
    for contexts in got.contexts.values():
        for c in contexts:  # the window starts at the user's text at the earliest
            assert "".join(c.tokens).startswith(c.prompt[:4])
    # the contexts come from many different texts, not one shared template window
    assert len({c.prompt for cs in got.contexts.values() for c in cs}) > 3
