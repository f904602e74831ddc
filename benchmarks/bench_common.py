"""Random-weight models and SAEs of real shapes, for benchmarks that need no downloads (e.g. on a lent GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    # Gemma-2-2B: 26 layers, d 2304, MLP 9216, 8 heads of 256 (4 KV heads), vocab 256k
    "gemma-2-2b": dict(arch="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    # Llama-3.1-8B: 32 layers, d 4096, MLP 14336, 32 heads of 128 (8 KV heads), vocab 128,256
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # a few-layer stand-in that runs on a CPU in seconds (benchmarks' --toy, the test suite)
    "toy": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512),
}


def emit(out: dict, path=None) -> None:
    """Print a benchmark's result as its last line of JSON (what RESULTS.md quotes), and write it to ``path``."""
    print(json.dumps(out), flush=True)
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(shape: str, device: torch.device, dtype: torch.dtype | None = None, n_layers: int | None = None):
    """(model, n_layers, d_model, vocab) with random weights, bf16 on CUDA, fp32 on CPU (unless ``dtype``);
    ``n_layers`` overrides the shape's layer count."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    cfg = dict(SHAPES[shape])
    arch = cfg.pop("arch")
    if n_layers:
        cfg["num_hidden_layers"] = n_layers
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if arch == "gemma2":
        config = Gemma2Config(**cfg, query_pre_attn_scalar=256, sliding_window=4096)
        cls = Gemma2ForCausalLM
    elif arch == "llama":
        config = LlamaConfig(**cfg, max_position_embeddings=4096)
        cls = LlamaForCausalLM
    else:
        config = Qwen2Config(**cfg)
        cls = Qwen2ForCausalLM
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)  # renamed in transformers 5
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model never exists in fp32 (32 GB) on the way
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.to(dtype).eval()
    return model, config.num_hidden_layers, config.hidden_size, config.vocab_size


def random_jumprelu_saes(layers, d: int, width: int, device: torch.device, seed: int = 0):
    """GemmaScope-like random JumpReLU SAEs (fp32): unit decoder rows, thresholds that keep L0 in the tens."""
    from refusalscope.saes.sae import Sae

    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for layer in layers:
        W_dec = torch.randn(width, d, generator=g, device=device)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        W_enc = W_dec.t().contiguous()
        out[layer] = Sae("jumprelu", W_enc, torch.zeros(width, device=device), W_dec, torch.zeros(d, device=device),
                         layer, threshold=torch.full((width,), 3.0, device=device))
    return out


# Chat templates of the two paper models, as their tokenizers apply them (Llama-3.1 always opens with a system
# header holding its knowledge cut-off date).
TEMPLATES = {
    "gemma2": ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
               "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "llama": ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]


def word_tokenizer(vocab_size: int, words, arch: str):
    """A word-level tokenizer over the whole model vocabulary, with no download: the special tokens, then
    ``words`` (one token each, as real tokenizers give common words), then fillers; any id decodes. Prompts come
    out about as long as with the real tokenizers (a word or punctuation mark per token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.padding_side = "left"
    fast.chat_template = TEMPLATES["gemma2" if arch == "gemma2" else "llama"]
    return fast


def calibrated_jumprelu_saes(layers, d: int, width: int, residuals: dict, *, l0: int = 64, device, seed: int = 0,
                             shared: bool = False, hold_dtype: torch.dtype | None = None):
    """Random JumpReLU SAEs (fp32, unit decoder rows, W_enc = W_decᵀ held as its own matrix) whose one threshold per
    layer puts about ``l0`` latents above it per token on ``residuals[layer]`` (T, d): active-feature counts like
    real SAEs', so Stage 3 has thousands of candidates. ``shared``: every layer uses one random decoder and encoder
    (a host-memory saving for 131k-wide sets; the columns each stage moves to the GPU are what a real set would
    move). ``hold_dtype``: each layer, once calibrated, is held in host memory in that dtype
    (``saes.placement.hold``), as ``--sae-dtype`` holds a loaded set."""
    from refusalscope.saes.placement import hold
    from refusalscope.saes.sae import Sae

    g = torch.Generator(device=device).manual_seed(seed)
    out, W_dec = {}, None
    for layer in layers:
        if W_dec is None or not shared:
            W_dec = torch.randn(width, d, generator=g, device=device)
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            # its own (d, width) matrix, as a loaded set has: the memory and the column gathers a real set costs
            W_enc = W_dec.t().contiguous()
        pre = residuals[layer].to(device=device, dtype=torch.float32) @ W_enc
        k = max(1, pre.numel() - l0 * pre.shape[0])
        thr = float(pre.flatten().kthvalue(k).values)
        out[layer] = Sae("jumprelu", W_enc, torch.zeros(width, device=device), W_dec, torch.zeros(d, device=device),
                         layer, threshold=torch.full((width,), max(thr, 1e-3), device=device))
        if hold_dtype is not None:
            out[layer] = hold(out[layer], hold_dtype)
    return out
