"""Chat formatting, left-padded tokenization and the post-instruction token positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusalscope.errors import RefusalScopeError

_PLACEHOLDER = "\x00REFUSALSCOPE_INSTRUCTION\x00"


def format_chat(tokenizer, instructions: Sequence[str], system: str | None = None) -> list[str]:
    """Each instruction as one user turn, followed by the template's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise RefusalScopeError("the tokenizer has no chat template; pass one with --chat-template")
    out = []
    for text in instructions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def post_instruction_suffix(tokenizer) -> str:
    """The template text after the user's instruction (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen)."""
    text = format_chat(tokenizer, [_PLACEHOLDER])[0]
    idx = text.find(_PLACEHOLDER)
    if idx < 0:
        raise RefusalScopeError("the chat template does not place the user's text verbatim; cannot find its end")
    return text[idx + len(_PLACEHOLDER):]


def template_prefix_length(tokenizer) -> int:
    """Tokens the chat template puts before the user's text (identical in every prompt: ``lm.shared_prefix``)."""
    text = format_chat(tokenizer, [_PLACEHOLDER])[0]
    return len(tokenizer.encode(text[:text.find(_PLACEHOLDER)], add_special_tokens=False))


def post_instruction_positions(tokenizer, last: int | None = None) -> list[int]:
    """Negative offsets of the post-instruction (end-of-instruction) tokens, oldest first.

    With left padding these index the same template tokens in every row. ``last=4`` gives the paper's
    "last 4 tokens" (Stage 3); None gives all of them (Arditi et al.'s candidate positions).
    """
    n = len(tokenizer.encode(post_instruction_suffix(tokenizer), add_special_tokens=False))
    if n == 0:
        raise RefusalScopeError("the chat template adds no tokens after the instruction")
    if last is not None:
        n = min(n, last)
    return list(range(-n, 0))


def tokenize(tokenizer, texts: Sequence[str], device: torch.device | str = "cpu",
             multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch (to a multiple of ``multiple_of`` tokens when given); special tokens come from the
    template text itself, so none are added here."""
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False,
                    pad_to_multiple_of=multiple_of)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
