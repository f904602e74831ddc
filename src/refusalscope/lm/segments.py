"""Where each token of a chat-formatted prompt sits: the first token, the system turn, the user text, the
post-instruction template (the tokens after the user text) or other template tokens.

The hydra analysis reports the share of woken features' activation on each (paper, "Redundant Features": 74% on
system tokens for LLaMA, 16% on <bos> for Gemma); the clamp analysis maps a firing position to a benign prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.prompts import format_chat, tokenize

SEGMENTS = ("first", "system", "user", "post_instruction", "template")

_USER = "\x00SEGMENT_USER\x00"
_SYSTEM = "\x00SEGMENT_SYSTEM\x00"


@dataclass(frozen=True)
class TemplateSpans:
    """Character lengths of a chat template's parts around one user turn (the same for every prompt)."""

    prefix: int  # template text before the user text
    suffix: int  # template text after the user text (the post-instruction tokens)
    system_end: int | None  # end of the system turn (from the text's start), None when the template renders none


def template_spans(tokenizer) -> TemplateSpans:
    """Where the user text and the system turn sit in ``format_chat``'s text.

    The system turn is found by rendering a placeholder system message: the text before it (P) and after it (Q)
    must frame the default rendering, whose middle is then the template's default system content (empty for
    Llama-3's dated header, "You are Qwen, ..." for Qwen2.5); the turn ends after that content and the closing
    text a system-only rendering puts after the placeholder. Templates that reject a system role or render none
    by default (Gemma, plain ChatML) have no system turn.
    """
    text = format_chat(tokenizer, [_USER])[0]
    i = text.find(_USER)
    if i < 0:
        raise RefusalScopeError("the chat template does not place the user's text verbatim; cannot find its tokens")
    prefix, suffix = i, len(text) - i - len(_USER)
    try:
        with_system = format_chat(tokenizer, [_USER], system=_SYSTEM)[0]
        system_only = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM}], tokenize=False,
                                                    add_generation_prompt=False)
    except Exception:  # templates that raise on a system role (Gemma's) have no system turn
        return TemplateSpans(prefix, suffix, None)
    j = with_system.find(_SYSTEM)
    if j < 0:
        return TemplateSpans(prefix, suffix, None)
    before, after = with_system[:j], with_system[j + len(_SYSTEM):]
    if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
        return TemplateSpans(prefix, suffix, None)
    default = text[len(before):len(text) - len(after)]
    k = system_only.find(_SYSTEM)
    closing = system_only[k + len(_SYSTEM):] if k >= 0 else ""
    end = len(before) + len(default) + (len(closing) if closing and after.startswith(closing) else 0)
    return TemplateSpans(prefix, suffix, min(end, prefix))


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token; slow tokenizers (no offset mapping) by decoding growing prefixes."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    ends = [len(tokenizer.decode(ids[:n + 1])) for n in range(len(ids))]
    return [(ends[n - 1] if n else 0, e) for n, e in enumerate(ends)]


def prompt_tokens(tokenizer, prompt: str, spans: TemplateSpans | None = None) -> tuple[list[int], list[str], list[str]]:
    """(token ids, token texts, segment of each token) of the formatted prompt, as the model sees it.

    Segments: "first" (position 0: BOS or the template's first token), "system" (the system turn), "user" (tokens
    overlapping the user text), "post_instruction" (everything after it), "template" (other template tokens, e.g.
    the user turn's header).
    """
    spans = spans or template_spans(tokenizer)
    text = format_chat(tokenizer, [prompt])[0]
    ids = tokenize(tokenizer, [text])["input_ids"][0].tolist()
    user = (spans.prefix, len(text) - spans.suffix)
    if user[0] > user[1]:  # the template changed the text around the user turn; fall back to a search
        start = text.find(prompt.strip())
        user = (start, start + len(prompt.strip())) if start >= 0 else (0, 0)
    segments, texts = [], []
    for n, (s, e) in enumerate(_offsets(tokenizer, text, ids)):
        texts.append(text[s:e] if e > s else tokenizer.decode([ids[n]]))
        if n == 0:
            segments.append("first")
        elif s < user[1] and e > user[0]:
            segments.append("user")
        elif s >= user[1]:
            segments.append("post_instruction")
        elif spans.system_end is not None and s < spans.system_end:
            segments.append("system")
        else:
            segments.append("template")
    return ids, texts, segments
