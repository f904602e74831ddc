import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.prompts import format_chat, post_instruction_positions, post_instruction_suffix, tokenize
from refusalscope.lm.registry import GEMMA_2_2B_IT, LLAMA_31_8B_IT, QWEN_CODER_05B

from helpers import build_tiny, make_tokenizer


def test_chatml_suffix_and_positions(tiny_lm):
    tok = tiny_lm.tokenizer
    assert post_instruction_suffix(tok) == QWEN_CODER_05B.eoi_suffix
    pos = post_instruction_positions(tok)
    n = len(tok.encode(QWEN_CODER_05B.eoi_suffix, add_special_tokens=False))
    assert pos == list(range(-n, 0))
    assert post_instruction_positions(tok, last=2) == [-2, -1]
    # the positions index the template tokens of every left-padded row
    batch = tokenize(tok, format_chat(tok, ["hi", "a much longer instruction about the sea"]))
    suffix_ids = torch.tensor(tok.encode(QWEN_CODER_05B.eoi_suffix, add_special_tokens=False))
    for row in batch["input_ids"]:
        assert torch.equal(row[pos], suffix_ids)


@pytest.mark.parametrize("entry", [GEMMA_2_2B_IT, LLAMA_31_8B_IT, QWEN_CODER_05B])
def test_registry_templates_end_with_their_suffix(entry, tiny_lm):
    tok = tiny_lm.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = entry.fallback_chat_template
        assert post_instruction_suffix(tok) == entry.eoi_suffix
    finally:
        tok.chat_template = saved


def test_left_padding(tiny_lm):
    tok = tiny_lm.tokenizer
    batch = tokenize(tok, ["a", "a longer text here"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_missing_chat_template_is_a_clear_error(tmp_path):
    with pytest.raises(RefusalScopeError, match="chat template"):
        format_chat(make_tokenizer(None), ["hello"])
    from refusalscope.lm.loading import load_model

    bare = build_tiny("llama", tmp_path / "bare", chat_template=None, n_layers=1)
    with pytest.raises(RefusalScopeError, match="no chat template"):
        load_model(str(bare), device="cpu")
    # an explicit template rescues it
    lm = load_model(str(bare), device="cpu", chat_template=QWEN_CODER_05B.fallback_chat_template)
    assert post_instruction_suffix(lm.tokenizer) == QWEN_CODER_05B.eoi_suffix
