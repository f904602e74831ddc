"""Real default model + trained SAEs: Algorithm 1's batched form gives the reference's sets on real prompts.

A small SAE set (3 layers, 1024 latents, trained on ~5k tokens of 300 prompts) is trained once and cached in the
user cache, which takes a few minutes; the width is small because 5k tokens cannot train 4096 latents (FVU 0.65 and
40% dead latents when we tried). The default set's quality is measured by ``refusalscope sae eval``.
"""

import pytest
import torch

from refusalscope.data import drop_overlap, load_prompts
from refusalscope.stages.scoring import refusal_probs
from refusalscope.saes.training.topk import TrainConfig
from refusalscope.saes.evals import evaluate_sae_set
from refusalscope.saes.training.cached import train_sae_set
from refusalscope.stages.stage1 import candidate_set, ranked_latents
from refusalscope.stages.stage2 import prune_batched, prune_sequential

pytestmark = pytest.mark.integration
TAUS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
LAYERS = [11, 15, 19]


@pytest.fixture(scope="module")
def lm():
    from refusalscope.lm.loading import load_model

    return load_model("qwen2.5-coder-0.5b-instruct", device="cpu")


@pytest.fixture(scope="module")
def small_saes(lm, data_dir):
    corpus = (load_prompts("harmless_train", data_dir=data_dir, limit=240).texts
              + load_prompts("harmful_train", data_dir=data_dir, limit=60).texts)
    cfg = TrainConfig(width=1024, k=32, epochs=12, batch_size=128)
    _, saes, _ = train_sae_set(lm, LAYERS, corpus, cfg, corpus_id="integration-test", progress=False)
    return saes


@pytest.fixture(scope="module")
def prompts(data_dir):
    seen = load_prompts("harmful_train", data_dir=data_dir).texts
    adv, _ = drop_overlap(seen, load_prompts("advbench", data_dir=data_dir))
    return adv.texts[:3]


def test_trained_saes_reconstruct(lm, small_saes, data_dir):
    table = evaluate_sae_set(lm, small_saes, load_prompts("harmless_test", data_dir=data_dir, limit=6).texts,
                             progress=False)
    assert (table.fvu < 0.5).all(), table
    assert (table.l0 <= 32).all()
    assert (table.dead_frac < 0.5).all(), table
    assert (table.ce_increase < 2.0).all(), table


def test_batched_equals_sequential_on_real_prompts(lm, small_saes, prompts):
    """3 real prompts × 3 seeds × every τ. P values are memoised by set for the reference (P is a pure function
    of the set), so the reference's decisions are checked, not re-timed."""
    direction = torch.randn(lm.d_model)  # any ranking gives a realistic candidate list; the run's r is not needed
    cands = candidate_set(ranked_latents(small_saes, direction, 20), 20)
    assert len(cands) == 60
    for prompt in prompts:
        cache: dict = {}

        def prob(member):
            return refusal_probs(lm, prompt, small_saes, [], candidates=cands, member=member, batch_size=64)

        def memo(member):
            keys = [tuple(row.tolist()) for row in member]
            missing = [k for k in dict.fromkeys(keys) if k not in cache]
            if missing:
                vals = prob(torch.tensor(missing))
                cache.update(zip(missing, vals.tolist()))
            return torch.tensor([cache[k] for k in keys], dtype=torch.float64)

        kept, chains = prune_batched(cands, memo, TAUS, [0, 1, 2])
        for seed in (0, 1, 2):
            for tau in TAUS:
                assert kept[(tau, seed)] == prune_sequential(cands, memo, tau, seed), (prompt, seed, tau)
        # and the memoised values are the batched ones: the chain's P(S_t) equal a fresh single-set forward
        c = chains[0]
        t = len(c.blocks) // 2
        removed = {f for V in c.blocks[:t] for f in V}
        fresh = prob(torch.tensor([[f not in removed for f in cands]]))
        assert abs(float(fresh[0]) - c.probs[t]) <= 1e-5 * max(c.probs[t], 1e-6)
