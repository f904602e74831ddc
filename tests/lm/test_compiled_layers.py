"""Compiled decoder layers for Stage-2 scoring (``lm.compiled_layers``): the same P and Stage-2 sets as eager
scoring, with and without shared rows, on every tiny architecture; graphs reused across prompts, scorers and batch
sizes; layers restored after the block; a failing compile is one error line.

``aot_eager`` captures the graphs dynamo would hand to inductor (guards, dynamic shapes, recompiles) without code
generation; one test runs ``inductor`` itself on the CPU."""

import pytest
import torch

from helpers import broken_compile_mode, compiled_graphs, random_sae
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.compiled_layers import compiled_layers
from refusalscope.lm.hooks import decoder_layers
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.stages.scoring import SetScorer
from refusalscope.stages.stage2 import prune_batched

PROMPTS = ["Tell me how to pick a lock.", "Write a poem about the sea and the sky, please, in three short lines."]
TAUS = [0.01, 0.05, 0.1]


def _setup(lm):
    saes = {layer: random_sae("jumprelu", d=lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2, 3)}
    cands = [(layer, i) for layer in (1, 2, 3) for i in range(0, 64, 2)]
    return saes, cands


def _stage2(lm, saes, cands, prompt, *, compile, share_rows, batch_size=16):
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]))
    scorer = SetScorer(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, cands, batch_size=batch_size,
                       share="layers", share_rows=share_rows, compile=compile)
    kept, chains = prune_batched(cands, scorer, TAUS, [0, 1, 2])
    return kept, torch.tensor([p for c in chains for p in c.probs], dtype=torch.float64)


@pytest.mark.parametrize("share_rows", [False, True])
def test_compiled_scoring_keeps_the_eager_sets(any_tiny_lm, share_rows):
    import torch._dynamo
    from torch._dynamo.utils import counters

    lm = any_tiny_lm
    saes, cands = _setup(lm)
    torch._dynamo.reset()
    counters.clear()  # reset() keeps dynamo's counters
    for prompt in PROMPTS:
        kept, probs = _stage2(lm, saes, cands, prompt, compile="off", share_rows=share_rows)
        kept_c, probs_c = _stage2(lm, saes, cands, prompt, compile="aot_eager", share_rows=share_rows)
        assert kept_c == kept
        assert torch.allclose(probs_c, probs, rtol=1e-5, atol=1e-9)
        assert probs.max() - probs.min() > 1e-4  # the ablations mattered
    assert compiled_graphs() >= 1 and not counters["graph_break"]  # the layers really ran compiled, whole
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(lm.model))  # restored


def test_compiled_layers_reuse_their_graphs(tiny_lm):
    """One graph per layer kind (and one more for a single row) serves every layer, prompt length, scorer and
    batch size: a second prompt and other batch sizes compile nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    saes, cands = _setup(tiny_lm)
    torch._dynamo.reset()
    counters.clear()
    _stage2(tiny_lm, saes, cands, PROMPTS[0], compile="aot_eager", share_rows=True)
    first = compiled_graphs()
    assert 1 <= first <= 2  # Qwen2's layers: rows ≥ 2, and the one-row start of shared rows
    _stage2(tiny_lm, saes, cands, PROMPTS[1], compile="aot_eager", share_rows=True)
    _stage2(tiny_lm, saes, cands, PROMPTS[1], compile="aot_eager", share_rows=False, batch_size=7)
    assert compiled_graphs() == first and not counters["graph_break"]


def test_compiled_layers_are_restored_and_leave_replayed_layers(tiny_lm):
    layers = decoder_layers(tiny_lm.model)
    replay = lambda *a, **k: None  # noqa: E731  (stands for hooks.replaying's swap)
    layers[0].forward = replay
    try:
        with pytest.raises(ValueError), compiled_layers(tiny_lm.model, "aot_eager"):
            assert layers[0].forward is replay and "forward" in layers[1].__dict__
            raise ValueError("a failing forward")
        assert layers[0].forward is replay
        assert all("forward" not in layer.__dict__ for layer in layers[1:])
    finally:
        del layers[0].forward
    with compiled_layers(tiny_lm.model, "off"):
        assert all("forward" not in layer.__dict__ for layer in layers)
    with pytest.raises(RefusalScopeError, match="unknown compile mode"):
        with compiled_layers(tiny_lm.model, "fast"):
            pass


def test_inductor_scoring_on_the_cpu_keeps_the_eager_sets(tiny_lm):
    """The mode a run uses, with generated kernels (CPU): fused element-wise work may round differently, the sets
    stay."""
    saes, cands = _setup(tiny_lm)
    kept, probs = _stage2(tiny_lm, saes, cands, PROMPTS[0], compile="off", share_rows=False)
    kept_c, probs_c = _stage2(tiny_lm, saes, cands, PROMPTS[0], compile="inductor", share_rows=False)
    assert kept_c == kept
    assert torch.allclose(probs_c, probs, rtol=1e-5, atol=1e-7)


def test_a_failing_scoring_compile_is_one_clear_error(tiny_lm, monkeypatch):
    import torch._dynamo

    name = broken_compile_mode(monkeypatch)
    saes, cands = _setup(tiny_lm)
    torch._dynamo.reset()
    with pytest.raises(RefusalScopeError, match=r"compiled scoring .* failed: .*no kernel for this op.*"
                                                r"--compile-scoring off"):
        _stage2(tiny_lm, saes, cands, PROMPTS[0], compile=name, share_rows=False)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(tiny_lm.model))
    torch._dynamo.reset()
