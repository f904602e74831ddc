"""StageContext: identical sets generated once, the completion cache reused across contexts and processes, and
cached completions equal to freshly generated ones."""

from helpers import FakeJudge, random_sae, spy_generate
from refusalscope.saes.features import Feature
from refusalscope.stages.context import CompletionCache, StageContext, set_key


def _ctx(tiny_lm, cache):
    saes = {layer: random_sae("relu", d=tiny_lm.d_model, m=24, layer=layer, seed=layer) for layer in (1, 2)}
    return StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=4, batch_size=8, cache=cache)


def test_identical_sets_are_generated_once_and_cached(tiny_lm, tmp_path, monkeypatch):
    calls = spy_generate(monkeypatch)
    ctx = _ctx(tiny_lm, CompletionCache(tmp_path / "c.sqlite"))
    a, b = [Feature(1, 3), Feature(2, 5)], [Feature(2, 7)]
    first = ctx.judged("hi there", [a, b, list(reversed(a)), []])
    assert [len(c) for c in calls] == [3]  # a, b and the empty set; a reversed is the same set
    assert first[0].completion == first[2].completion
    again = ctx.judged("hi there", [b, a])
    assert [len(c) for c in calls] == [3]
    assert [x.completion for x in again] == [first[1].completion, first[0].completion]
    # another context on the same file (a resumed run, an analysis) generates nothing either
    other = _ctx(tiny_lm, CompletionCache(tmp_path / "c.sqlite"))
    assert [x.completion for x in other.judged("hi there", [a])] == [first[0].completion]
    assert [len(c) for c in calls] == [3]
    # other generation settings are another key
    other.max_new_tokens = 5
    other.judged("hi there", [a])
    assert [len(c) for c in calls] == [3, 1]


def test_cached_completion_equals_a_fresh_generation(tiny_lm, monkeypatch):
    ctx = _ctx(tiny_lm, CompletionCache())
    sets = [[Feature(1, 3)], [Feature(2, 5), Feature(1, 1)]]
    cached = [x.completion for x in ctx.judged("Tell me a story.", sets)]
    fresh = [x.completion for x in _ctx(tiny_lm, CompletionCache()).judged("Tell me a story.", sets)]
    assert cached == fresh


def test_set_key_is_canonical():
    assert set_key([(2, 5), Feature(1, 3), "L2/5"]) == (Feature(1, 3), Feature(2, 5))


def test_early_stop_gives_the_full_length_verdicts_under_its_own_cache_key(tiny_lm, monkeypatch):
    """With early_stop the judge's verdicts equal those of full-length completions; the shorter completions are
    cached under settings that name the judge, so a context without early stop never reuses them."""
    from refusalscope.judges import Combined, SubstringJudge

    sets = [[], [Feature(1, 3)], [Feature(2, 5), Feature(1, 1)], [Feature(2, i) for i in range(10)]]
    cache = CompletionCache()
    full_ctx = _ctx(tiny_lm, cache)
    full_ctx.max_new_tokens = 12
    full = full_ctx.judged("Tell me a story.", sets)
    # a judge that "refuses" on a piece of text one of these completions starts with
    text = next(x.completion.strip() for x in full if len(x.completion.strip()) >= 6)
    judge = Combined(SubstringJudge([text[:3]]))
    want = judge.judge(["Tell me a story."] * len(sets), [x.completion for x in full])
    assert any(v.refused for v in want)
    calls = spy_generate(monkeypatch)
    stop_ctx = _ctx(tiny_lm, cache)
    stop_ctx.max_new_tokens, stop_ctx.judge, stop_ctx.early_stop = 12, judge, True
    assert stop_ctx.generation_settings["stopped_by"] == judge.name
    stopped = stop_ctx.judged("Tell me a story.", sets)
    assert [len(c) for c in calls] == [len(sets)]  # the full-length completions in the cache were not reused
    assert [(v.refused, v.jailbroken) for v in want] == [(x.verdict.refused, x.jailbroken) for x in stopped]
    assert any(len(s.completion) < len(f.completion) for s, f in zip(stopped, full))
    assert all(f.completion.startswith(s.completion) for s, f in zip(stopped, full))


def _flow(prompt, rounds):
    """A flow that asks for ``rounds`` (lists of sets) one after another and returns the completions it got."""
    got = []
    for sets in rounds:
        res = yield [(prompt, s) for s in sets]
        got.append([r.completion for r in res])
    return got


def test_lockstep_sends_each_round_of_every_flow_through_one_batch(tiny_lm, monkeypatch):
    calls = spy_generate(monkeypatch)
    a, b = Feature(1, 0), Feature(2, 3)
    long, short = "Tell me, in great detail and step by step, how to pick a lock.", "Bake a cake."
    flows = [_flow(long, [[[a], [b]], [[a, b]]]), _flow(short, [[[a]]]), _flow(short, [])]
    together = _ctx(tiny_lm, CompletionCache()).lockstep(flows)
    # round 1: both prompts' rows in one batch (with padding); round 2: the long one's last
    assert [len(c) for c in calls] == [3, 1]
    assert together[2] == []
    alone = _ctx(tiny_lm, CompletionCache())
    assert together[0] == [[r.completion for r in alone.judged(long, [[a], [b]])],
                           [alone.judged(long, [[a, b]])[0].completion]]
    assert together[1] == [[alone.judged(short, [[a]])[0].completion]]
    assert len({c for got in together for part in got for c in part}) > 1  # the ablations change the text
