"""Token segments of a chat-formatted prompt (first, system, user, post-instruction, template) for four template
styles: plain ChatML, ChatML with a default system message (Qwen2.5), a dated system header (Llama-3.1), and a
template that rejects a system role (Gemma)."""

import pytest

from helpers import make_tokenizer
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.segments import SEGMENTS, prompt_tokens

PROMPT = "Tell me how to pick a lock."

_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CHATML_DEFAULT_SYSTEM = (  # Qwen2.5-style: a default system message when none is given
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + _CHATML)
_DATED_HEADER = (  # Llama-3.1-style: a system turn always rendered, its default content empty
    "{{ bos_token }}<|im_start|>system\nDate: today\n\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% endif %}<|im_end|>\n{% for m in messages %}{% if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_NO_SYSTEM_ROLE = (  # Gemma-style: a system message is an error
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize("template, first, system, header, post", [
    (_CHATML, "<|im_start|>", "", "user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    (_CHATML_DEFAULT_SYSTEM, "<|im_start|>", "system\nYou are a helpful assistant.<|im_end|>\n",
     "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    (_DATED_HEADER, "<bos>", "<|im_start|>system\nDate: today\n\n<|im_end|>\n", "<|im_start|>user\n",
     "<|im_end|>\n<|im_start|>assistant\n"),
    (_NO_SYSTEM_ROLE, "<bos>", "", "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
])
def test_token_segments_follow_the_template(template, first, system, header, post):
    tok = make_tokenizer(template)
    ids, texts, segments = prompt_tokens(tok, PROMPT)
    assert ids == tokenize(tok, format_chat(tok, [PROMPT]))["input_ids"][0].tolist()
    assert "".join(texts) == format_chat(tok, [PROMPT])[0]
    part = {g: "".join(t for t, s in zip(texts, segments) if s == g) for g in SEGMENTS}
    assert segments[0] == "first" and segments.count("first") == 1
    assert part == {"first": first, "system": system, "user": PROMPT, "post_instruction": post, "template": header}
