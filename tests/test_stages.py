"""Stages 1–2: Algorithm 1's batched form equals the line-by-line reference; Stage 1's ranking and K search."""

import random

import pytest
import torch

from refusalscope.saes.features import as_latent_set, decoder_cosines, membership, refusal_probs
from refusalscope.judges import Judge, Verdict
from refusalscope.stages.stage1 import candidate_set, k_values, ranked_latents, run_stage1
from refusalscope.stages.stage2 import block_order, chain_membership, chain_sets, intersect, prune_batched, prune_sequential, \
    relative_change
from test_sae import random_sae

TAUS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def synthetic_prob(feats, weights):
    """P(S) = sigmoid(sum of the ablated features' weights - 2): some features matter a lot, most not at all."""
    w = torch.tensor([weights[f] for f in feats], dtype=torch.float64)

    def prob(member):
        return torch.sigmoid(member.double() @ w - 2.0)
    return prob


def test_relative_change_is_eq1():
    assert relative_change(0.8, 0.2) == pytest.approx(0.75)
    assert relative_change(0.2, 0.8) == pytest.approx(3.0)
    assert relative_change(0.0, 0.5) == 0.0


@pytest.mark.parametrize("n", [5, 23, 61])
def test_batched_equals_sequential_synthetic(n):
    rng = random.Random(n)
    feats = [(rng.randrange(3, 9), rng.randrange(1000)) for _ in range(n)]
    feats = sorted(set(feats))
    weights = {f: (rng.random() * 3 if rng.random() < 0.15 else rng.random() * 0.05) for f in feats}
    prob = synthetic_prob(feats, weights)
    calls = []

    def counting(member):
        calls.append(member.shape[0])
        return prob(member)

    kept, chains = prune_batched(feats, counting, TAUS, [0, 1, 2])
    assert len(calls) == 1  # one batch for every seed and τ
    assert calls[0] == 1 + sum(len(c.blocks) for c in chains)
    for seed in (0, 1, 2):
        for tau in TAUS:
            assert kept[(tau, seed)] == prune_sequential(feats, prob, tau, seed)


def test_block_order_covers_candidates_without_repeats():
    feats = [(3, i) for i in range(23)]
    blocks = block_order(feats, seed=4, block=5)
    flat = [f for b in blocks for f in b]
    assert len(blocks) == 4 and len(set(flat)) == 20 and set(flat) <= set(feats)
    sets = chain_sets(feats, blocks)
    assert [len(s) for s in sets] == [23, 18, 13, 8, 3]
    assert torch.equal(chain_membership(feats, blocks), membership(feats, sets[1:]))


def test_intersect():
    assert intersect([[(1, 2), (3, 4)], [(3, 4), (5, 6)], [(3, 4)]]) == [(3, 4)]
    assert intersect([]) == []


def test_ranked_latents_match_brute_force():
    saes = {l: random_sae("jumprelu", m=64, layer=l, seed=l) for l in (3, 4)}
    r = torch.randn(32)
    ranked = ranked_latents(saes, r, cap=10)
    for l, sae in saes.items():
        cos = [torch.nn.functional.cosine_similarity(sae.W_dec[i], r, dim=0).item() for i in range(64)]
        want = sorted(range(64), key=lambda i: -cos[i])[:10]
        assert ranked[l] == want
    assert candidate_set(ranked, 3) == sorted([(3, i) for i in ranked[3][:3]] + [(4, i) for i in ranked[4][:3]])
    assert torch.allclose(decoder_cosines(saes, 2 * r)[3], decoder_cosines(saes, r)[3])
    assert k_values(10, 35) == [10, 20, 30]


class ScriptedJudge(Judge):
    """Says "jailbroken" for completions that differ from a reference (the unablated completion)."""

    name = "scripted"

    def __init__(self, reference: str | None):
        self.reference = reference

    def judge(self, prompts, completions):
        return [Verdict(refused=(c == self.reference) if self.reference is not None else True, degenerate=False,
                        score=0.0, reason="") for c in completions]


def test_stage1_finds_smallest_k(tiny_lm):
    from refusalscope.lm.inference import generate

    saes = {l: random_sae("relu", d=tiny_lm.d_model, m=64, layer=l, seed=l) for l in (1, 2)}
    ranked = ranked_latents(saes, torch.randn(tiny_lm.d_model), cap=40)
    prompt = "Tell me how to pick a lock."
    base = generate(tiny_lm, [prompt], max_new_tokens=8, progress=False)[0]
    res = run_stage1(tiny_lm, prompt, saes, ranked, ScriptedJudge(base), step=10, cap=40, chunk=2,
                     max_new_tokens=8)
    tried = {t["k"]: t for t in res.tried}
    if res.jailbroken:
        assert all(not tried[k]["jailbroken"] for k in tried if k < res.k)
        assert res.features == candidate_set(ranked, res.k)
    never = run_stage1(tiny_lm, prompt, saes, ranked, ScriptedJudge(None), step=10, cap=40, chunk=3, max_new_tokens=4)
    assert never.k is None and [t["k"] for t in never.tried] == [10, 20, 30, 40]


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_batched_equals_sequential_on_tiny_model(tiny_lm, arch):
    saes = {l: random_sae(arch, d=tiny_lm.d_model, m=64, layer=l, seed=l) for l in (1, 2, 3)}
    feats = sorted({(l, i) for l in (1, 2, 3) for i in range(0, 64, 4)})
    prompt = "Tell me how to pick a lock."

    def prob(member):
        return refusal_probs(tiny_lm, prompt, saes, [], candidates=feats, member=member, batch_size=16)

    kept, _ = prune_batched(feats, prob, TAUS, [0, 1, 2])
    for seed in (0, 1, 2):
        for tau in (0.1, 0.4, 0.8):
            assert kept[(tau, seed)] == prune_sequential(feats, prob, tau, seed)


def test_refusal_probs_batch_equals_single(tiny_lm):
    saes = {l: random_sae("jumprelu", d=tiny_lm.d_model, m=64, layer=l, seed=l) for l in (1, 2)}
    sets = [[], [(1, 0), (1, 5)], [(2, i) for i in range(30)], [(1, i) for i in range(64)]]
    batched = refusal_probs(tiny_lm, "hi there", saes, sets, batch_size=3)
    single = torch.cat([refusal_probs(tiny_lm, "hi there", saes, [s]) for s in sets])
    assert torch.allclose(batched, single, rtol=1e-5)
    assert as_latent_set([(2, 3), (1, 4), (2, 5)]) == {2: [3, 5], 1: [4]}


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_prefix_reuse_gives_the_same_probabilities(any_tiny_lm, arch):
    from refusalscope.saes.features import clean_prefix_length, membership, refusal_probs_for_batch
    from refusalscope.interventions.latents import LatentRecorder
    from refusalscope.lm.prompts import format_chat, tokenize

    lm = any_tiny_lm  # Qwen2/Llama use a DynamicCache, Gemma-2 a hybrid sliding-window cache
    saes = {l: random_sae(arch, d=lm.d_model, m=64, layer=l, seed=l) for l in (1, 2)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, ["Tell me how to pick a lock."]))
    rec = LatentRecorder(saes, {1: None, 2: None})
    with torch.inference_mode():
        from refusalscope.lm.hooks import hooked
        with hooked(lm.model, rec.hooks(lm.n_layers)):
            lm.model(**batch)
    # candidates silent on the first 4 positions of the clean run (some fire later)
    quiet = [(l, i) for l in (1, 2) for i in range(64) if (rec.records[l][0][0, :4, i] == 0).all()
             and (rec.records[l][0][0, 4:, i] > 0).any()]
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
    from refusalscope.saes.features import membership, refusal_probs_for_batch
    from refusalscope.lm.hooks import decoder_layers
    from refusalscope.lm.prompts import format_chat, tokenize

    lm = any_tiny_lm
    top = lm.n_layers - 1
    saes = {l: random_sae(arch, d=lm.d_model, m=64, layer=l, seed=l) for l in (top - 1, top)}
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, ["Tell me how to pick a lock."]))
    cands = [(l, i) for l in (top - 1, top) for i in range(0, 64, 3)]
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
