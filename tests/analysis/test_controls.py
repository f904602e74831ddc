"""Stage-2 sanity checks: inactive features found, the set without them judged, random sets of the same size drawn
from the prompt's active features with a per-prompt seed."""

from helpers import FakeJudge, random_sae
from refusalscope.analysis.controls import run_controls
from refusalscope.saes.features import Feature
from refusalscope.stages.context import StageContext

PROMPT = "Tell me how to pick a lock."


def _ctx(tiny_lm):
    saes = {layer: random_sae("topk", d=tiny_lm.d_model, m=32, layer=layer, seed=layer) for layer in (1, 2)}
    return StageContext(tiny_lm, saes, FakeJudge.always(refused=False), max_new_tokens=3, batch_size=8)


def test_controls_find_inactive_features_and_draw_active_random_sets(tiny_lm):
    ctx = _ctx(tiny_lm)
    every = ctx.activations(PROMPT, [Feature(layer, i) for layer in (1, 2) for i in range(32)])
    active = sorted(f for f, v in every.items() if v > 0)
    inactive = sorted(f for f, v in every.items() if v <= 0)
    chosen = active[:3] + inactive[:2]
    out = run_controls(ctx, PROMPT, chosen, tau=0.2, jailbroken=True, n_random=3, seed=7, prompt_id=4)
    assert out.size == 5 and out.tau == 0.2 and out.jailbroken
    assert sorted(out.inactive) == inactive[:2] and out.n_inactive == 2
    assert out.without_inactive is not None and sorted(out.without_inactive.features) == active[:3]
    assert len(out.random) == 3
    for r in out.random:
        assert len(r.features) == 5 and set(r.features) <= set(active) and r.jailbroken
    again = run_controls(ctx, PROMPT, chosen, tau=0.2, jailbroken=True, n_random=3, seed=7, prompt_id=4)
    assert [r.features for r in again.random] == [r.features for r in out.random]  # seeded per prompt
    other = run_controls(ctx, PROMPT, chosen, tau=0.2, jailbroken=True, n_random=3, seed=7, prompt_id=5)
    assert [r.features for r in other.random] != [r.features for r in out.random]


def test_controls_of_an_all_active_set_skip_the_without_check(tiny_lm):
    ctx = _ctx(tiny_lm)
    active = sorted(ctx.activations(PROMPT))[:2]
    out = run_controls(ctx, PROMPT, active, tau=0.1, jailbroken=False, n_random=1)
    assert out.n_inactive == 0 and out.without_inactive is None and len(out.random) == 1
    assert run_controls(ctx, PROMPT, [], tau=0.1, jailbroken=False).random == []
