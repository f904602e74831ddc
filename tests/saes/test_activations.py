"""SAE training activations and the SAE quality report: the shared-prefix fast path against the plain forward."""

import torch

from helpers import count_calls, differences_beyond_rounding, random_sae
from refusalscope.saes import evals
from refusalscope.saes.evals import evaluate_sae_set
from refusalscope.saes.training import activations
from refusalscope.saes.training.activations import collect

PROMPTS = [f"Write a poem about the sea, verse {i}." for i in range(3)] + \
    ["hi", "Tell me how to pick a lock, step by step, in great detail please.", "cake?", "Name three rivers."]


def test_shared_prefix_collects_the_plain_tokens(any_tiny_lm, tmp_path, monkeypatch):
    """Same tokens in the same (corpus) order, the template prefix kept for every 2nd prompt, over chunks and
    length-sorted batches; values equal up to float16 rounding of float rounding."""
    layers = [1, 2]
    kw = dict(batch_size=3, chunk_prompts=4, prefix_every=2, progress=False)
    split = count_calls(monkeypatch, activations, "suffix_forward")
    fast = collect(any_tiny_lm, PROMPTS, layers, tmp_path / "fast", **kw)
    assert len(split) == 3  # every batch (2 + 1 over the two chunks) ran after the shared prefix
    plain = collect(any_tiny_lm, PROMPTS, layers, tmp_path / "plain", share_prefix=False, **kw)
    assert len(split) == 3
    for layer in layers:
        assert fast[layer].shape == plain[layer].shape
        assert torch.allclose(fast[layer].float(), plain[layer].float(), rtol=2e-3, atol=2e-3), layer
        # positions matter, not only the multiset: neighbouring tokens differ by far more than rounding
        assert not torch.allclose(fast[layer][1:].float(), plain[layer][:-1].float(), rtol=2e-3, atol=2e-3)


def test_shared_prefix_collect_resumes_plain_chunks(tiny_lm, tmp_path, monkeypatch):
    """A collection interrupted under one path and resumed under the other reads its finished chunks as they are."""
    from safetensors.torch import load_file

    kw = dict(batch_size=2, chunk_prompts=4, progress=False)
    whole = collect(tiny_lm, PROMPTS, [1], tmp_path / "a", share_prefix=False, **kw)
    first = load_file(str(tmp_path / "a" / "chunk_00000.safetensors"))["layer_1"].shape[0]
    (tmp_path / "a" / "chunk_00001.safetensors").unlink()
    runs = count_calls(monkeypatch, activations, "prompt_activations")
    resumed = collect(tiny_lm, PROMPTS, [1], tmp_path / "a", **kw)
    chat = activations.format_chat(tiny_lm.tokenizer, PROMPTS)
    assert sorted(t for call in runs for t in call[1]) == sorted(chat[4:])  # only chunk 1 was computed
    assert torch.equal(resumed[1][:first], whole[1][:first])
    assert torch.allclose(resumed[1].float(), whole[1].float(), rtol=2e-3, atol=2e-3)


def test_quality_report_same_with_shared_prefix(any_tiny_lm, monkeypatch):
    lm = any_tiny_lm
    saes = {layer: random_sae("topk", d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    split = count_calls(monkeypatch, evals, "suffix_forward")
    fast = evaluate_sae_set(lm, saes, PROMPTS, batch_size=3, progress=False)
    assert len(split) == 3 * (2 + 2)  # 3 batches: the activations, the clean CE, one spliced CE per layer
    split.clear()
    plain = evaluate_sae_set(lm, saes, PROMPTS, batch_size=3, share_prefix=False, progress=False)
    assert split == []
    assert (fast["tokens"] > 0).all() and (fast["ce_increase"].abs() > 0).all()
    assert differences_beyond_rounding(fast.to_dict("records"), plain.to_dict("records"), rel=1e-4) == []
