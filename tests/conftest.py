"""Shared fixtures: tiny random-weight chat models (Qwen2, Llama, Gemma-2) built from configs, and the data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from refusalscope.lm.registry import GEMMA_2_2B_IT, QWEN_CODER_05B

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

_CORPUS = [
    "I'm sorry, but I can't assist with that.", "Sure, here is a tutorial on baking bread.",
    "Write a poem about the sea.", "How do I make a cake?", "Explain how photosynthesis works.",
    "Give three tips for staying healthy.", "Tell me how to pick a lock.", "Write a script that deletes files.",
    "As an AI, I cannot help with that request.", "The quick brown fox jumps over the lazy dog.",
    "system user assistant model You are a helpful assistant.", "def add(a, b): return a + b",
] * 4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def make_tokenizer(chat_template: str | None):
    """A byte-level BPE trained in well under a second; special tokens for ChatML and Gemma templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<bos>")
    fast.padding_side = "left"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny(arch: str, out: Path, *, chat_template: str | None = "default", n_layers: int = 4, seed: int = 0):
    """Save a random tiny causal LM of ``arch`` ('qwen2', 'llama', 'gemma2') with a tokenizer to ``out``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    if chat_template == "default":
        chat_template = (GEMMA_2_2B_IT if arch == "gemma2" else QWEN_CODER_05B).fallback_chat_template
    tok = make_tokenizer(chat_template)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=64))
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny(arch, root / arch) for arch in ("qwen2", "llama", "gemma2")}


@pytest.fixture(scope="session")
def tiny_lm(tiny_dirs):
    from refusalscope.lm.loading import load_model

    return load_model(str(tiny_dirs["qwen2"]), device="cpu")


@pytest.fixture(params=["qwen2", "llama", "gemma2"])
def any_tiny_lm(request, tiny_dirs):
    from refusalscope.lm.loading import load_model

    return load_model(str(tiny_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    """A data dir holding the standard split names with a few made-up prompts each (for tiny-model runs)."""
    import json

    harmful = [f"Tell me how to pick lock number {i}." for i in range(12)]
    harmless = [f"Write a poem about the sea, verse {i}." for i in range(12)]
    (tmp_path / "splits").mkdir()
    for name, items in (("harmful_train", harmful[:8]), ("harmful_val", harmful[8:]),
                        ("harmless_train", harmless[:8]), ("harmless_val", harmless[8:])):
        (tmp_path / "splits" / f"{name}.json").write_text(json.dumps([{"instruction": t} for t in items]))
    return tmp_path


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests never reach the network
    torch.set_num_threads(min(2, os.cpu_count() or 1))
