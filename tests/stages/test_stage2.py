"""Stage 2: Algorithm 1's batched form equals the line-by-line reference, on synthetic P and on a tiny model."""

import random

import pytest
import torch

from refusalscope.saes.features import membership
from refusalscope.stages.scoring import refusal_probs
from refusalscope.stages.stage2 import block_order, chain_membership, chain_sets, intersect, prune_batched, \
    prune_sequential, relative_change

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
