import torch

from refusalscope.lm.inference import collect_residuals, generate, length_sorted_batches, map_last_logits
from refusalscope.interventions import DirectionAblation

PROMPTS = ["Write a poem about the sea.", "hi", "Tell me how to pick a lock, step by step, in detail.", "cake?"]


def test_batches_cover_everything_once(tiny_lm):
    texts = ["a", "a b c d", "a b", "a b c d e f g"]
    batches = list(length_sorted_batches(texts, tiny_lm.tokenizer, 3))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert batches[0][0] == 3  # longest first


def test_last_logits_do_not_depend_on_batching(any_tiny_lm):
    """Left padding with attention masks: batch size and order must not change the answer."""
    lm = any_tiny_lm
    one = map_last_logits(lm, PROMPTS, lambda x: x, batch_size=1, progress=False)
    four = map_last_logits(lm, PROMPTS, lambda x: x, batch_size=4, progress=False)
    assert torch.allclose(one, four, atol=1e-4)
    rev = map_last_logits(lm, PROMPTS[::-1], lambda x: x, batch_size=4, progress=False)
    assert torch.allclose(rev.flip(0), four, atol=1e-4)


def test_only_last_position_is_computed(tiny_lm):
    out = map_last_logits(tiny_lm, PROMPTS, lambda x: x, progress=False)
    assert out.shape == (len(PROMPTS), tiny_lm.model.config.vocab_size)


def test_generation_is_batch_invariant_and_ordered(tiny_lm):
    single = [generate(tiny_lm, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    batched = generate(tiny_lm, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    assert batched == single
    assert any(c for c in batched)  # random weights still emit text


def test_generation_under_intervention_differs(tiny_lm):
    r = torch.randn(tiny_lm.d_model) * 10
    plain = generate(tiny_lm, PROMPTS, max_new_tokens=6, progress=False)
    ablated = generate(tiny_lm, PROMPTS, max_new_tokens=6, interventions=[DirectionAblation(r)], progress=False)
    assert plain != ablated


def test_collect_residuals_matches_hidden_states(tiny_lm):
    from refusalscope.lm.prompts import format_chat, tokenize

    acts = collect_residuals(tiny_lm, PROMPTS[:2], [-2, -1], progress=False)
    assert acts.shape == (2, tiny_lm.n_layers, 2, tiny_lm.d_model)
    batch = tokenize(tiny_lm.tokenizer, format_chat(tiny_lm.tokenizer, PROMPTS[:1]))
    with torch.no_grad():
        hs = tiny_lm.model(**batch, output_hidden_states=True).hidden_states
    for layer in range(tiny_lm.n_layers):  # hidden_states[l] is the input of layer l
        assert torch.allclose(acts[0, layer, 1], hs[layer][0, -1], atol=1e-4)


def test_generation_stops_a_row_once_stop_says_so(tiny_lm):
    from refusalscope.judges import SubstringJudge

    full = generate(tiny_lm, PROMPTS, max_new_tokens=12, batch_size=4, progress=False)
    row = next(i for i, c in enumerate(full) if len(c.strip()) >= 6)
    phrase = full[row].strip()[:3]  # appears within the first tokens of that row
    judge = SubstringJudge([phrase])
    stopped = generate(tiny_lm, PROMPTS, max_new_tokens=12, batch_size=4, progress=False,
                       stop=judge.decided)
    assert len(stopped[row]) < len(full[row]) and full[row].startswith(stopped[row])
    for f, s in zip(full, stopped):
        assert f.startswith(s)  # a stopped row is its full completion cut short, never different text
        assert judge.judge([""], [s])[0].refused == judge.judge([""], [f])[0].refused
        if not judge.decided([""], [f])[0]:
            assert s == f  # rows the judge never decides run to the end
