"""Stage 2: Algorithm 1's batched form equals the line-by-line reference, on synthetic P and on a tiny model."""

import random
from dataclasses import replace

import pytest
import torch

from refusalscope.saes.features import membership
from refusalscope.stages.scoring import refusal_probs
from refusalscope.stages.stage2 import block_order, build_chains, build_chains_skipping, chain_membership, chain_sets, \
    intersect, prune_batched, prune_sequential, relative_change

from helpers import random_sae

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


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_batched_equals_sequential_on_tiny_model(tiny_lm, arch):
    saes = {layer: random_sae(arch, d=tiny_lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2, 3)}
    feats = sorted({(layer, i) for layer in (1, 2, 3) for i in range(0, 64, 4)})
    prompt = "Tell me how to pick a lock."

    def prob(member):
        return refusal_probs(tiny_lm, prompt, saes, [], candidates=feats, member=member, batch_size=16)

    kept, _ = prune_batched(feats, prob, TAUS, [0, 1, 2])
    for seed in (0, 1, 2):
        for tau in (0.1, 0.4, 0.8):
            assert kept[(tau, seed)] == prune_sequential(feats, prob, tau, seed)


def causal_prob(feats, weights, base, parent):
    """A stand-in for the model whose firing pattern depends on the ablated set, as SAE features do through the
    layers: feature f fires when base[f] XOR (its parent is ablated and fires); P(S) depends only on the ablated
    features that fire. Returns a FiredProbFn."""
    order = sorted(range(len(feats)), key=lambda j: feats[j])  # layer order
    w = torch.tensor([weights[f] for f in feats], dtype=torch.float64)

    def prob(member):
        out_p, out_f = [], []
        for row in member.tolist():
            fires = [False] * len(feats)
            for j in order:
                p = parent.get(j)
                fires[j] = base[j] ^ (p is not None and row[p] and fires[p])
            f = torch.tensor(fires) & torch.tensor(row, dtype=torch.bool)
            out_f.append(f)
            out_p.append(torch.sigmoid(f.double() @ w - 2.0))
        return torch.stack(out_p), torch.stack(out_f)
    return prob


@pytest.mark.parametrize("n,batch_size", [(23, 1), (61, 4), (61, 64)])
def test_skipping_inactive_blocks_gives_the_same_chains_with_fewer_forwards(n, batch_size):
    rng = random.Random(n)
    feats = sorted({(rng.randrange(3, 9), rng.randrange(1000)) for _ in range(n)})
    weights = {f: (rng.random() * 3 if rng.random() < 0.3 else rng.random() * 0.05) for f in feats}
    base = [rng.random() < 0.25 for _ in feats]  # most features silent, as on a real prompt
    parent = {j: rng.randrange(j) for j in range(1, len(feats)) if rng.random() < 0.4 and feats[j][0] > 3}
    parent = {j: p for j, p in parent.items() if feats[p][0] < feats[j][0]}  # parents sit in lower layers
    prob = causal_prob(feats, weights, base, parent)
    full = build_chains(feats, lambda m: prob(m)[0], [0, 1, 2])
    skipped, stats = build_chains_skipping(feats, prob, [0, 1, 2], batch_size=batch_size)
    rows = 1 + sum(len(c.blocks) for c in full)
    assert stats["scored"] + stats["skipped"] >= rows and stats["skipped"] > 0
    assert stats["scored"] < rows
    for a, b in zip(full, skipped):
        assert a.blocks == b.blocks and a.probs == b.probs  # exactly: a skipped step has its predecessor's P
        for tau in TAUS:
            assert a.kept(tau) == b.kept(tau) == prune_sequential(feats, lambda m: prob(m)[0], tau, a.seed)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_skipping_on_a_tiny_model_matches_the_full_chains(tiny_lm, arch):
    """Latents that never fire (a huge threshold or bias) make whole blocks silent; skipping them changes no P
    and no kept set, and scores fewer sets."""
    from dataclasses import replace

    from refusalscope.stages.scoring import prompt_scorer

    saes = {}
    for layer in (1, 2, 3):
        sae = random_sae(arch, d=tiny_lm.d_model, m=64, layer=layer, seed=layer)
        b_enc = sae.b_enc.clone()
        b_enc[32:] = -1e4  # latents 32.. never fire
        saes[layer] = replace(sae, b_enc=b_enc)
    feats = sorted({(layer, i) for layer in (1, 2, 3) for i in [*range(0, 32, 4), *range(32, 64)]})
    prompt = "Tell me how to pick a lock."
    scorer = prompt_scorer(tiny_lm, prompt, saes, feats, batch_size=16)
    full = build_chains(feats, scorer, [0, 1, 2])
    skipped, stats = build_chains_skipping(feats, lambda m: scorer(m, fired=True), [0, 1, 2], batch_size=16)
    rows = 1 + sum(len(c.blocks) for c in full)
    assert stats["skipped"] > 0 and stats["scored"] < rows
    assert len({round(p, 9) for c in full for p in c.probs}) > 1  # the ablations matter
    for a, b in zip(full, skipped):
        assert torch.allclose(torch.tensor(a.probs), torch.tensor(b.probs), rtol=1e-6, atol=1e-9)
        for tau in TAUS:
            assert a.kept(tau) == b.kept(tau)


def test_run_stage2_skip_option(tiny_lm):
    from helpers import FakeJudge
    from refusalscope.stages.context import StageContext
    from refusalscope.stages.stage2 import run_stage2

    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=64, layer=layer, seed=layer) for layer in (1, 2)}
    feats = sorted({(layer, i) for layer in (1, 2) for i in range(0, 64, 3)})
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=3, batch_size=8, score_batch_size=16)
    assert not ctx.skips_inactive()  # CPU default with shared rows (the default)
    assert replace(ctx, share_rows=False).skips_inactive()  # CPU default without them
    on = run_stage2(ctx, "Tell me a story.", feats, taus=[0.1, 0.4], seeds=[0, 1], skip_inactive=True)
    off = run_stage2(ctx, "Tell me a story.", feats, taus=[0.1, 0.4], seeds=[0, 1])
    assert [r.features for r in on.per_tau] == [r.features for r in off.per_tau]
    assert {k: off.scored[k] for k in ("scored", "skipped")} == {
        "scored": 1 + sum(len(c.blocks) for c in off.chains), "skipped": 0}
    assert off.scored["layer_rows"] < off.scored["layer_rows_one_per_set"]  # shared rows saved work
    assert on.scored["scored"] + on.scored["skipped"] >= off.scored["scored"]
