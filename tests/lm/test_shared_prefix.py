"""The template prefix once, its cache repeated: the same logits as the plain left-padded forward, up to rounding."""

import torch

from helpers import count_calls
from refusalscope.interventions import ActivationAddition, DirectionAblation
from refusalscope.lm import inference
from refusalscope.lm.hooks import Hook
from refusalscope.lm.inference import collect_residuals, map_last_logits
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.shared_prefix import prefix_forward, split_on_prefix, suffix_forward, suffix_last_logits
from refusalscope.lm.prompts import template_prefix_length

PROMPTS = ["Write a poem about the sea.", "hi", "Tell me how to pick a lock, step by step, in detail.", "cake?"]


def test_split_then_forward_gives_the_plain_logits(any_tiny_lm):
    lm = any_tiny_lm
    texts = format_chat(lm.tokenizer, PROMPTS)
    p = template_prefix_length(lm.tokenizer)
    split = split_on_prefix(lm.tokenizer, texts, p)
    assert split is not None and split.prefix.shape == (1, p)
    lengths = split.mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # rows of different lengths: right padding is exercised
    batch = tokenize(lm.tokenizer, texts)
    with torch.inference_mode():
        plain = lm.model(**batch, use_cache=False).logits.float()
    cache, last = prefix_forward(lm, split, logits=True)
    logits = suffix_forward(lm, split, cache, logits=True)
    width = batch["input_ids"].shape[1]
    for row, n in enumerate(lengths):
        start = width - n  # left padding: the row's own tokens are its last n
        assert batch["input_ids"][row, start:].tolist() == split.suffix[row, :n].tolist()
        assert torch.allclose(logits[row, :n], plain[row, start:], atol=1e-4), row
        assert torch.allclose(last[0], plain[row, start - 1], atol=1e-4), row  # the prefix's last position


def test_no_split_without_a_common_prefix(tiny_lm):
    tok = tiny_lm.tokenizer
    texts = format_chat(tok, PROMPTS)
    assert split_on_prefix(tok, texts, 0) is None
    p = template_prefix_length(tok)
    other = format_chat(tok, ["Write a poem about the sea."], system="You are a pirate. Answer in rhymes.")[0]
    assert len(tok.encode(other, add_special_tokens=False)) > p  # long enough: its start is what differs
    assert split_on_prefix(tok, [*texts, other], p) is None
    assert split_on_prefix(tok, texts, p) is not None
    # a text that is all prefix has no own token to run
    prefix_text = tok.decode(tok.encode(texts[0], add_special_tokens=False)[:p])
    assert split_on_prefix(tok, [prefix_text, *texts], p) is None


def _direction(lm, seed=0):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))


def test_last_logits_after_the_shared_prefix_are_the_plain_ones(any_tiny_lm, monkeypatch):
    """map_last_logits(share_prefix=True): each row's last real token (rows end at different suffix positions),
    under no edit, direction ablation and activation addition; every batch really split."""
    lm = any_tiny_lm
    split = count_calls(monkeypatch, inference, "suffix_last_logits")
    r = _direction(lm)
    for ivs in ([], [DirectionAblation(r)], [ActivationAddition(r, 1, 4.0)]):
        plain = map_last_logits(lm, PROMPTS, lambda x: x, interventions=ivs, batch_size=3, progress=False)
        shared = map_last_logits(lm, PROMPTS, lambda x: x, interventions=ivs, batch_size=3, progress=False,
                                 share_prefix=True)
        assert torch.allclose(shared, plain, atol=1e-4), ivs
    assert len(split) == 3 * 2  # two batches (3 + 1 prompts) per intervention list
    assert not torch.allclose(shared, map_last_logits(lm, PROMPTS, lambda x: x, progress=False), atol=1e-3)


def test_residuals_after_the_shared_prefix_are_the_plain_ones(any_tiny_lm, monkeypatch):
    lm = any_tiny_lm
    split = count_calls(monkeypatch, inference, "suffix_forward")
    positions = [-3, -2, -1]
    ablate = [DirectionAblation(_direction(lm))]
    for ivs in ([], ablate, [ActivationAddition(_direction(lm, 2), 1, 3.0)]):
        plain = collect_residuals(lm, PROMPTS, positions, batch_size=3, interventions=ivs, progress=False)
        shared = collect_residuals(lm, PROMPTS, positions, batch_size=3, interventions=ivs, progress=False,
                                   share_prefix=True)
        assert torch.allclose(shared, plain, atol=1e-4)
    assert len(split) == 3 * 2
    # a position inside the prefix (for the shortest prompt) runs that batch plainly
    own = split_on_prefix(lm.tokenizer, format_chat(lm.tokenizer, PROMPTS), template_prefix_length(lm.tokenizer))
    deep = [-int(own.lengths.min()) - 1]
    before = len(split)
    assert torch.allclose(collect_residuals(lm, PROMPTS, deep, progress=False, share_prefix=True),
                          collect_residuals(lm, PROMPTS, deep, progress=False), atol=1e-4)
    assert len(split) == before


def test_edits_that_differ_by_row_or_position_run_plainly(tiny_lm, monkeypatch):
    """Per-row directions, edits not marked uniform and extra hooks keep the plain forward (same results)."""
    lm = tiny_lm
    split = count_calls(monkeypatch, inference, "suffix_last_logits")
    per_row = DirectionAblation(torch.randn(len(PROMPTS), lm.d_model, generator=torch.Generator().manual_seed(1)))
    assert not per_row.uniform and DirectionAblation(_direction(lm)).uniform
    recorded = []
    hook = Hook("resid_pre", 1, lambda h: recorded.append(h.shape))
    for kw in ({"interventions": [per_row]}, {"extra_hooks": [hook]}):
        plain = map_last_logits(lm, PROMPTS, lambda x: x, progress=False, **kw)
        shared = map_last_logits(lm, PROMPTS, lambda x: x, progress=False, share_prefix=True, **kw)
        assert torch.equal(shared, plain)
    assert split == []
    assert all(len(shape) == 3 and shape[0] == len(PROMPTS) for shape in recorded)  # whole batches, not one row


def test_the_head_sees_each_rows_last_token_only_ties_included(any_tiny_lm):
    """Rows of equal and of different suffix lengths in one batch: each row's logits are its own last token's,
    and the output head is handed one position per row (B, 1, d)."""
    lm = any_tiny_lm
    prompts = ["hi", "yo", "Tell me how to pick a lock, step by step, in detail."]
    texts = format_chat(lm.tokenizer, prompts)
    split = split_on_prefix(lm.tokenizer, texts, template_prefix_length(lm.tokenizer))
    lengths = split.lengths.tolist()
    assert lengths[0] == lengths[1] != lengths[2]
    seen = []
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        cache, _ = prefix_forward(lm, split)
        seen.clear()
        logits = suffix_last_logits(lm, split, cache)
    finally:
        handle.remove()
    assert seen == [torch.Size([3, 1, lm.d_model])]
    plain = map_last_logits(lm, prompts, lambda x: x, progress=False)
    assert torch.allclose(logits, plain, atol=1e-4)
    assert len(lm.model.get_output_embeddings()._forward_pre_hooks) == 1  # the gather is gone (the loader's stays)


def test_positions_from_the_end_stay_in_each_rows_own_tokens(tiny_lm):
    texts = format_chat(tiny_lm.tokenizer, PROMPTS)
    split = split_on_prefix(tiny_lm.tokenizer, texts, template_prefix_length(tiny_lm.tokenizer))
    n = split.lengths
    assert split.from_end([-1])[:, 0].tolist() == (n - 1).tolist()
    assert split.from_end([-2, -1]).tolist() == torch.stack([n - 2, n - 1], 1).tolist()
    assert split.from_end([-int(n.min()) - 1]) is None  # reaches into the prefix for the shortest row
    assert split.from_end([0]) is None and split.from_end([-1, 1]) is None  # not counted from the end
    per_row_coeff = ActivationAddition(_direction(tiny_lm), 1, torch.ones(len(PROMPTS)))
    assert not per_row_coeff.uniform and ActivationAddition(_direction(tiny_lm), 1, 2.0).uniform
