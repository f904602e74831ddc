import pytest
import torch

from refusalscope.interventions.projection import unit
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.hooks import Hook, decoder_layers, hooked, residual_writers
from refusalscope.lm.inference import collect_residuals, map_last_logits
from refusalscope.interventions import ActivationAddition, DirectionAblation

PROMPTS = ["Write a poem about the sea.", "Tell me how to pick a lock.", "hi"]


def _logits(lm, **kw):
    return map_last_logits(lm, PROMPTS, lambda x: x, progress=False, **kw)


def _hook_count(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def test_identity_edit_changes_nothing(any_tiny_lm):
    lm = any_tiny_lm
    base = _logits(lm)
    hooks = [Hook(p, layer, lambda h: h.clone()) for layer in range(lm.n_layers) for p in ("resid_pre", "resid_post",
                                                                                   "attn_out", "mlp_out")]
    assert torch.equal(_logits(lm, extra_hooks=hooks), base)


def test_hooks_removed_even_on_exception(any_tiny_lm):
    lm = any_tiny_lm
    before = _hook_count(lm.model)

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _logits(lm, extra_hooks=[Hook("resid_pre", 1, boom)])
    assert _hook_count(lm.model) == before


def test_layer_out_of_range(tiny_lm):
    with pytest.raises(RefusalScopeError, match="out of range"):
        with hooked(tiny_lm.model, [Hook("resid_pre", tiny_lm.n_layers, lambda h: h)]):
            pass


def test_unknown_point(tiny_lm):
    with pytest.raises(RefusalScopeError, match="hook point"):
        with hooked(tiny_lm.model, [Hook("nowhere", 0, lambda h: h)]):
            pass


def test_gemma_writers_are_the_post_norms(tiny_dirs):
    from refusalscope.lm.loading import load_model

    lm = load_model(str(tiny_dirs["gemma2"]), device="cpu")
    layer = decoder_layers(lm.model)[0]
    assert residual_writers(layer) == (layer.post_attention_layernorm, layer.post_feedforward_layernorm)


def test_directional_ablation_removes_direction_everywhere(any_tiny_lm):
    """After ablation no layer's input, nor any block's write, has a component along r̂ (Arditi et al.)."""
    lm = any_tiny_lm
    r = unit(torch.randn(lm.d_model))
    seen = []

    def probe(h):
        seen.append((h.float() @ r).abs().max().item())

    probes = [Hook(p, layer, probe) for layer in range(lm.n_layers) for p in ("resid_pre", "attn_out", "mlp_out")]
    map_last_logits(lm, PROMPTS, lambda x: x, interventions=[DirectionAblation(r)], extra_hooks=probes,
                    progress=False)
    assert len(seen) == len(probes) and max(seen) < 1e-4
    # and it does change the output
    assert not torch.allclose(_logits(lm, interventions=[DirectionAblation(r)]), _logits(lm))


def test_ablating_subset_of_layers_only_touches_those(tiny_lm):
    lm = tiny_lm
    r = unit(torch.randn(lm.d_model))
    acts = collect_residuals(lm, PROMPTS, [-1], interventions=[DirectionAblation(r, layers=(2,))], progress=False)
    comp = (acts[:, :, 0] @ r).abs()  # (N, L)
    assert comp[:, 2].max() < 1e-4 and comp[:, 1].max() > 1e-3


def test_per_row_directions_match_separate_runs(tiny_lm):
    lm = tiny_lm
    torch.manual_seed(3)
    rs = torch.randn(len(PROMPTS), lm.d_model)
    batched = map_last_logits(lm, PROMPTS, lambda x: x, interventions=[DirectionAblation(rs)], batch_size=3,
                              progress=False)
    for i, p in enumerate(PROMPTS):
        single = map_last_logits(lm, [p], lambda x: x, interventions=[DirectionAblation(rs[i])], progress=False)
        assert torch.allclose(batched[i], single[0], atol=1e-4)


def test_activation_addition_adds_at_one_layer(tiny_lm):
    lm = tiny_lm
    r = torch.randn(lm.d_model)
    base = collect_residuals(lm, PROMPTS, [-1], progress=False)
    added = collect_residuals(lm, PROMPTS, [-1], interventions=[ActivationAddition(r, 2, coeff=3.0)],
                              progress=False)
    assert torch.allclose(added[:, :2], base[:, :2])
    assert torch.allclose((added[:, 2, 0] - base[:, 2, 0]) @ unit(r), torch.full((3,), 3.0), atol=1e-4)
