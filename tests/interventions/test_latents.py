"""Latent interventions against the paper's formula: fast = dense = reference, per-row = one by one, empty = identity,
and ablation holds at every step of generation."""

import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.interventions.base import Intervention
from refusalscope.lm.hooks import Hook
from refusalscope.lm.inference import collect_residuals, generate, map_last_logits
from refusalscope.interventions.latents import LatentAblation, LatentClamp, LatentRecorder, ablation_delta, plan_sets, \
    reference_ablate

from helpers import ARCH_LIST, random_sae

PROMPTS = ["Write a poem about the sea.", "Tell me how to pick a lock.", "hi"]


def _logits(lm, prompts=PROMPTS, **kw):
    return map_last_logits(lm, prompts, lambda x: x, progress=False, **kw)


def saes_for(lm, arch, layers=(1, 2), width=48):
    return {layer: random_sae(arch, d=lm.d_model, m=width, layer=layer, seed=layer) for layer in layers}


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_delta_fast_dense_reference_agree(arch):
    sae = random_sae(arch, m=96)
    h = torch.randn(3, 5, 32)
    S = [0, 5, 17, 40, 95]
    plans, _ = plan_sets({1: sae}, {1: S})
    ref = reference_ablate(sae, h, S)
    for fast in (True, False):
        got = h - ablation_delta(plans[1], h, fast=fast)
        assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_model_forward_fast_equals_dense(any_tiny_lm, arch):
    lm = any_tiny_lm
    saes = saes_for(lm, arch)
    sets = {1: [0, 3, 7, 11, 20], 2: [1, 2, 30]}
    fast = _logits(lm, interventions=[LatentAblation.build(saes, sets, fast=True)])
    dense = _logits(lm, interventions=[LatentAblation.build(saes, sets, fast=False)])
    assert torch.allclose(fast, dense, atol=1e-4)
    assert not torch.allclose(fast, _logits(lm), atol=1e-4)  # the ablation did something


def test_layers_compose_like_sequential_reference(tiny_lm):
    """Two layers in one pass = reference formula applied at layer 1, then at layer 2 on the edited stream."""
    lm = tiny_lm
    saes = saes_for(lm, "relu")
    sets = {1: [0, 3, 7, 11, 20], 2: [1, 2, 30]}
    ref_hooks = [Hook("resid_post", layer,
                      lambda h, layer=layer: reference_ablate(saes[layer], h, sets[layer]).to(h.dtype))
                 for layer in (1, 2)]
    ours = _logits(lm, interventions=[LatentAblation.build(saes, sets)])
    ref = _logits(lm, extra_hooks=ref_hooks)
    assert torch.allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_empty_set_is_exact_identity(any_tiny_lm, arch):
    lm = any_tiny_lm
    saes = saes_for(lm, arch)
    base = _logits(lm)
    assert torch.equal(_logits(lm, interventions=[LatentAblation.build(saes, {1: [], 2: []})]), base)
    # per-row: rows whose set is empty are untouched, bit for bit
    per_row = LatentAblation.build(saes, [{1: []}, {1: list(range(24))}, {2: []}])
    got = _logits(lm, interventions=[per_row])
    assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
    assert not torch.allclose(got[1], base[1])


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_per_row_sets_equal_one_by_one(tiny_lm, arch):
    lm = tiny_lm
    saes = saes_for(lm, arch)
    prompt = ["Tell me how to pick a lock."]
    sets = [{1: [0, 1]}, {1: [5, 6, 7], 2: [3]}, {2: [10, 11, 12, 13]}, {1: list(range(20)), 2: list(range(20))}]
    batched = map_last_logits(lm, prompt * len(sets), lambda x: x, progress=False, batch_size=3,
                              interventions=[LatentAblation.build(saes, sets)])
    for r, s in enumerate(sets):
        single = _logits(lm, prompt, interventions=[LatentAblation.build(saes, s)])
        assert torch.allclose(batched[r], single[0], atol=1e-4)


def test_positions_subset(tiny_lm):
    lm = tiny_lm
    saes = saes_for(lm, "relu")
    sets = {1: list(range(30))}
    last_only = LatentAblation.build(saes, sets, positions=[-1])
    resid_last = collect_residuals(lm, PROMPTS, [-1], layers=[2], interventions=[last_only], progress=False)
    resid_prev = collect_residuals(lm, PROMPTS, [-2], layers=[2], interventions=[last_only], progress=False)
    clean_prev = collect_residuals(lm, PROMPTS, [-2], layers=[2], progress=False)
    assert torch.equal(resid_prev, clean_prev)  # earlier positions untouched (causal)
    clean_last = collect_residuals(lm, PROMPTS, [-1], layers=[2], progress=False)
    assert not torch.allclose(resid_last, clean_last)


def test_clamp_first_token_matches_formula(tiny_lm):
    from refusalscope.lm.hooks import current_attention_mask

    lm = tiny_lm
    sae = random_sae("relu", d=lm.d_model, m=48, layer=1)
    S, v = [2, 9], 4.0
    captured = {}

    def grab(h):
        captured["h"], captured["mask"] = h.detach().clone(), current_attention_mask().clone()

    _logits(lm, extra_hooks=[Hook("resid_post", 1, grab)])
    clean, mask = captured["h"].float(), captured["mask"]
    _logits(lm, interventions=[LatentClamp.build({1: sae}, {1: S}, v, positions="first")],
            extra_hooks=[Hook("resid_post", 1, grab)])
    edited = captured["h"].float()
    first = mask.int().argmax(1)
    z = sae.encode(clean)
    want = clean.clone()
    for r, p in enumerate(first.tolist()):  # the formula at each row's first real token, nothing elsewhere
        want[r, p] = clean[r, p] + (v - z[r, p, S]) @ sae.W_dec[S]
    assert torch.allclose(edited, want, atol=1e-5)
    assert len(set(first.tolist())) > 1  # rows really had different padding


def test_recorder_matches_encode(tiny_lm):
    lm = tiny_lm
    saes = saes_for(lm, "topk")
    rec = LatentRecorder(saes, {1: None, 2: [0, 4, 9]}, positions=[-1])
    _logits(lm, batch_size=8, interventions=[rec])
    resid = collect_residuals(lm, PROMPTS, [-1], layers=[2, 3], batch_size=8, progress=False)  # resid_pre 2 = post 1
    z1 = torch.cat(rec.records[1])  # (B, 1, width) in the batch's (length-sorted) order
    assert z1.shape == (3, 1, 48)
    want = saes[1].encode(resid[:, 0, 0])
    assert torch.allclose(torch.sort(z1[:, 0].sum(-1)).values, torch.sort(want.sum(-1)).values, atol=1e-4)
    assert torch.cat(rec.records[2]).shape == (3, 1, 3)


class _Probe(Intervention):
    """Records resid_post of one layer at every forward call of generation (the prompt, then each new token)."""

    def __init__(self, layer: int):
        self.layer, self.seen = layer, []

    def hooks(self, n_layers):
        return [Hook("resid_post", self.layer, lambda h: self.seen.append(h.detach().float().clone()))]


def test_ablation_applies_during_generation(tiny_lm):
    lm = tiny_lm
    saes = saes_for(lm, "relu", width=48)
    big = {1: list(range(48)), 2: list(range(48))}

    def run(sets):
        """Completions, and layer 1's stream at every step just before and just after the ablation's hook."""
        before, after = _Probe(1), _Probe(1)
        ablation = [] if sets is None else [LatentAblation.build(saes, sets)]
        out = generate(lm, PROMPTS, max_new_tokens=6, batch_size=8, progress=False,
                       interventions=[before, *ablation, after])
        return out, before.seen, after.seen

    base, _, clean = run(None)
    assert len(clean) == 6 and all(h.shape[1] == 1 for h in clean[1:])  # the prompt pass, then one per new token
    # the empty set changes nothing: same tokens, same stream bit for bit at every step
    same, _, empty = run({1: [], 2: []})
    assert same == base
    assert len(empty) == len(clean) and all(torch.equal(a, b) for a, b in zip(empty, clean))
    # a real set changes the generated tokens, and is applied (by the paper's formula) at every step, not just
    # to the prompt: the stream after the hook is the reference ablation of the stream before it
    abl, pre, post = run(big)
    assert abl != base
    assert len(post) == len(pre) > 1
    for step, (h, h_abl) in enumerate(zip(pre, post)):
        assert not torch.allclose(h_abl, h, atol=1e-4), step
        assert torch.allclose(h_abl, reference_ablate(saes[1], h, big[1]), atol=1e-5), step


def test_errors(tiny_lm):
    saes = saes_for(tiny_lm, "relu")
    with pytest.raises(RefusalScopeError, match="no SAE for layer 3"):
        LatentAblation.build(saes, {3: [1]})
    with pytest.raises(RefusalScopeError, match="out of range"):
        LatentAblation.build(saes, {1: [48]})
    per_row = LatentAblation.build(saes, [{1: [0]}, {1: [1]}])
    with pytest.raises(RefusalScopeError, match="latent sets but the batch has"):
        _logits(tiny_lm, interventions=[type(per_row)(per_row.plans, False)])


def test_membership_plans_equal_set_plans(tiny_lm):
    from refusalscope.saes.features import membership

    saes = saes_for(tiny_lm, "jumprelu")
    cands = [(1, 0), (1, 3), (1, 7), (2, 1), (2, 2), (2, 30)]
    sets = [cands, cands[:2], [], [(2, 30), (1, 7)]]
    member = membership(cands, sets)
    prompt = ["Tell me how to pick a lock."] * len(sets)
    per_layer = [{layer: [i for m, i in s if m == layer] for layer in (1, 2)} for s in sets]
    by_sets = map_last_logits(tiny_lm, prompt, lambda x: x, progress=False,
                              interventions=[LatentAblation.build(saes, per_layer)])
    by_member = map_last_logits(tiny_lm, prompt, lambda x: x, progress=False,
                                interventions=[LatentAblation.from_membership(saes, cands, member)])
    assert torch.allclose(by_sets, by_member, atol=1e-5)
