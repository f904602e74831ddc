"""SAE training activations and the SAE quality report: the shared-prefix fast path against the plain forward."""

import torch

from helpers import differences_beyond_rounding, random_sae
from refusalscope.saes.evals import evaluate_sae_set
from refusalscope.saes.training.activations import collect

PROMPTS = [f"Write a poem about the sea, verse {i}." for i in range(3)] + \
    ["hi", "Tell me how to pick a lock, step by step, in great detail please.", "cake?", "Name three rivers."]


def test_shared_prefix_collects_the_plain_tokens(any_tiny_lm, tmp_path):
    """Same tokens in the same (corpus) order, the template prefix kept for every 2nd prompt, over chunks and
    length-sorted batches; values equal up to float16 rounding of float rounding."""
    layers = [1, 2]
    kw = dict(batch_size=3, chunk_prompts=4, prefix_every=2, progress=False)
    fast = collect(any_tiny_lm, PROMPTS, layers, tmp_path / "fast", **kw)
    plain = collect(any_tiny_lm, PROMPTS, layers, tmp_path / "plain", share_prefix=False, **kw)
    for layer in layers:
        assert fast[layer].shape == plain[layer].shape
        assert torch.allclose(fast[layer].float(), plain[layer].float(), rtol=2e-3, atol=2e-3), layer
        # positions matter, not only the multiset: neighbouring tokens differ by far more than rounding
        assert not torch.allclose(fast[layer][1:].float(), plain[layer][:-1].float(), rtol=2e-3, atol=2e-3)


def test_shared_prefix_collect_resumes_plain_chunks(tiny_lm, tmp_path):
    """A collection interrupted under one path and resumed under the other reads its finished chunks as they are."""
    kw = dict(batch_size=2, chunk_prompts=4, progress=False)
    from safetensors.torch import load_file

    whole = collect(tiny_lm, PROMPTS, [1], tmp_path / "a", share_prefix=False, **kw)
    first = load_file(str(tmp_path / "a" / "chunk_00000.safetensors"))["layer_1"].shape[0]
    (tmp_path / "a" / "chunk_00001.safetensors").unlink()
    resumed = collect(tiny_lm, PROMPTS, [1], tmp_path / "a", **kw)
    assert torch.equal(resumed[1][:first], whole[1][:first])  # chunk 0 read back, not recomputed
    assert torch.allclose(resumed[1].float(), whole[1].float(), rtol=2e-3, atol=2e-3)


def test_quality_report_same_with_shared_prefix(any_tiny_lm):
    lm = any_tiny_lm
    d = lm.d_model
    saes = {layer: random_sae("topk", d=d, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    fast = evaluate_sae_set(lm, saes, PROMPTS, batch_size=3, progress=False)
    plain = evaluate_sae_set(lm, saes, PROMPTS, batch_size=3, share_prefix=False, progress=False)
    assert (fast["tokens"] > 0).all() and (fast["ce_increase"].abs() > 0).all()
    assert differences_beyond_rounding(fast.to_dict("records"), plain.to_dict("records"), rel=1e-4) == []
