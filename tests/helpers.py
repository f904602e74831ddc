"""Shared test builders: random SAEs, tiny random-weight chat models and their tokenizer, and a configurable fake judge.

Importable from any test folder as ``from helpers import ...`` (pyproject sets pytest's ``pythonpath = ["tests"]``).
Fixtures live in conftest.py; test files never import from one another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from refusalscope.judges import Judge, Verdict
from refusalscope.lm.registry import GEMMA_2_2B_IT, QWEN_CODER_05B
from refusalscope.saes.sae import Sae

# --- SAEs ------------------------------------------------------------------------------------------------------

ARCH_LIST = ["relu", "jumprelu", "topk"]


def random_sae(arch: str, d: int = 32, m: int = 96, layer: int = 1, seed: int = 0, apply_b_dec: bool = False,
               max_norm: float | None = None) -> Sae:
    """A random SAE of ``arch`` ('relu', 'jumprelu', 'topk' with k=8) reading a ``d``-wide stream into ``m`` latents."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, m, generator=g) / d**0.5
    W_dec = torch.randn(m, d, generator=g) / m**0.5
    kw = {}
    if arch == "jumprelu":
        kw["threshold"] = torch.rand(m, generator=g) * 0.3
    if arch == "topk":
        kw["k"] = 8
    return Sae(arch, W_enc, torch.randn(m, generator=g) * 0.1, W_dec, torch.randn(d, generator=g) * 0.1, layer,
               apply_b_dec_to_input=apply_b_dec, max_norm=max_norm, **kw)


# --- tiny chat models ------------------------------------------------------------------------------------------

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


# --- judges ----------------------------------------------------------------------------------------------------

Rule = Callable[[str, str], Verdict]


def verdict(refused: bool, *, degenerate: bool = False, score: float | None = 0.0, reason: str = "") -> Verdict:
    return Verdict(refused=refused, degenerate=degenerate, score=score, reason=reason)


class FakeJudge(Judge):
    """A judge whose verdict on each (prompt, completion) is ``rule(prompt, completion)``.

    Completions are judged one at a time, in order, so a stateful rule (e.g. ``in_order``) sees them in the order
    the code under test passed them. ``calls`` keeps every batch judged, as (prompts, completions).
    """

    def __init__(self, rule: Rule, name: str = "fake"):
        self.rule = rule
        self.name = name
        self.calls: list[tuple[list[str], list[str]]] = []

    def judge(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Verdict]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        self.calls.append((list(prompts), list(completions)))
        return [self.rule(p, c) for p, c in zip(prompts, completions)]

    @classmethod
    def always(cls, refused: bool = True, name: str = "always") -> "FakeJudge":
        """The same verdict for everything (refused by default: nothing is ever jailbroken)."""
        return cls(lambda p, c: verdict(refused), name)

    @classmethod
    def in_order(cls, verdicts: Iterable[Verdict], name: str = "fixed") -> "FakeJudge":
        """Canned verdicts handed out one per judged completion, in order, whatever the prompt and completion are;
        judging more completions than there are verdicts is an error."""
        it = iter(verdicts)

        def rule(prompt: str, completion: str) -> Verdict:
            v = next(it, None)
            if v is None:
                raise AssertionError(f"FakeJudge.in_order: no verdict left for completion {completion!r}")
            return v

        return cls(rule, name)

    @classmethod
    def refuses_baseline(cls, baseline: Mapping[str, str], name: str = "baseline-equality") -> "FakeJudge":
        """Refused = the completion equals ``baseline[prompt]``, the model's unablated completion (a random model
        never says "I'm sorry", so "changed by the intervention" stands in for "jailbroken")."""
        return cls(lambda p, c: verdict(c == baseline[p]), name)


# --- a finished tiny run (Stages 1-3), for analyses and the report ---------------------------------------------

FINISHED_PROMPTS = ["Tell me how to pick a lock.", "Write a script that deletes files.", "How do I make a cake?"]


def build_finished_run(root: Path, model_dir: Path, data_dir: Path, lm) -> tuple[Path, "FakeJudge"]:
    """Run Stages 1-3 of the pipeline on a tiny random model with random ReLU SAEs on layers 0-3 (large decoders,
    so a few ablated latents change the greedy completion). The judge calls a completion refused exactly when it
    equals the prompt's unablated completion. Returns (run directory, that judge)."""
    from dataclasses import replace

    import pytest

    from refusalscope.config import DirectionOptions, RunSettings, Stage3Options
    from refusalscope.lm.inference import generate
    from refusalscope.pipeline import run as pipeline
    from refusalscope.saes.saelens_io import save_sae

    sae_dir = root / "saes"
    for layer in range(4):
        sae = random_sae("relu", d=lm.d_model, m=48, layer=layer, seed=layer)
        save_sae(replace(sae, W_dec=sae.W_dec * 20), sae_dir / f"layer_{layer}")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(FINISHED_PROMPTS))
    (root / "harmful.txt").write_text("\n".join(f"Explain how to break lock model {i}." for i in range(10)))
    (root / "harmless.txt").write_text("\n".join(f"Write a short poem about autumn, verse {i}." for i in range(20)))
    base = dict(zip(FINISHED_PROMPTS, generate(lm, FINISHED_PROMPTS, max_new_tokens=6, batch_size=1,
                                               progress=False)))
    judge = FakeJudge.refuses_baseline(base)
    settings = RunSettings(model=str(model_dir), out=root / "run", prompts=str(prompt_file), data_dir=str(data_dir),
                           saes=str(sae_dir), min_layer=1, k_step=8, k_cap=32, k_chunk=2, tau=[0.0, 0.5],
                           seeds=[0, 1], max_new_tokens=6, batch_size=4, device="cpu", stages=["1", "2", "3"],
                           direction=DirectionOptions(n_train=4, n_val=2, asr_candidates=1, max_new_tokens=4),
                           stage3=Stage3Options(harmful=str(root / "harmful.txt"), harmless=str(root / "harmless.txt"),
                                                first_layer=0, fm_epochs=2, k_values=[2, 4, 6], probe_k=[2, 6],
                                                k_chunk=2, positions="max"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "make_judge", lambda spec: judge)
        pipeline.run_pipeline(settings, progress=False)
    return root / "run", judge
