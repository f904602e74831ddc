"""Random-weight models and SAEs of real shapes, for benchmarks that need no downloads (e.g. on a lent GPU)."""

from __future__ import annotations

import torch

SHAPES = {
    # Gemma-2-2B: 26 layers, d 2304, MLP 9216, 8 heads of 256 (4 KV heads), vocab 256k
    "gemma-2-2b": dict(arch="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(shape: str, device: torch.device):
    """(model, n_layers, d_model, vocab) with random weights, bf16 on CUDA, fp32 on CPU."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = dict(SHAPES[shape])
    arch = cfg.pop("arch")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if arch == "gemma2":
        config = Gemma2Config(**cfg, query_pre_attn_scalar=256, sliding_window=4096)
        cls = Gemma2ForCausalLM
    else:
        config = Qwen2Config(**cfg)
        cls = Qwen2ForCausalLM
    config.torch_dtype = dtype
    with torch.device(device):
        model = cls(config).to(dtype)
    model.eval()
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
