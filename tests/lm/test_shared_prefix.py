"""The template prefix once, its cache repeated: the same logits as the plain left-padded forward, up to rounding."""

import torch

from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.shared_prefix import prefix_forward, split_on_prefix, suffix_forward
from refusalscope.saes.training.activations import template_prefix_length

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
