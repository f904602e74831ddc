"""Residual-stream activations of many layers from one forward pass per batch, stored compactly for SAE training.

Tokens kept: every real (non-pad) token except each row's first (the attention sink, whose norm is ~100× the
rest). The chat template's shared prefix (e.g. Qwen's default system prompt) yields identical activations in
every prompt, so it is kept only for every ``prefix_every``-th prompt. Chunks are fp16 safetensors files written
atomically, so an interrupted collection resumes at the first missing chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusalscope.lm.hooks import Hook, StopForward, hooked
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import _PLACEHOLDER, format_chat, tokenize
from refusalscope.store import _atomic


def template_prefix_length(tokenizer) -> int:
    """Tokens the chat template puts before the user's text (identical in every prompt)."""
    text = format_chat(tokenizer, [_PLACEHOLDER])[0]
    return len(tokenizer.encode(text[:text.find(_PLACEHOLDER)], add_special_tokens=False))


def resid_post_batch(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], hooks: Sequence[Hook] = (),
                     full: bool = False) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """resid_post of ``layers`` for formatted ``texts`` (B, T, d) and the tokenized batch.

    Stops the forward after the last requested layer unless ``full``.
    """
    batch = tokenize(lm.tokenizer, texts, lm.device)
    store: dict[int, torch.Tensor] = {}
    last = max(layers)

    def recorder(layer):
        def edit(h):
            store[layer] = h.detach()
            if layer == last and not full:
                raise StopForward
        return edit

    rec = [Hook("resid_post", layer_id, recorder(layer_id)) for layer_id in layers]
    try:
        with torch.inference_mode(), hooked(lm.model, [*hooks, *rec]):
            lm.model(**batch, logits_to_keep=1, use_cache=False)
    except StopForward:
        pass
    return store, batch


def token_mask(attention_mask: torch.Tensor, prefix_len: int, keep_prefix: torch.Tensor) -> torch.Tensor:
    """Which positions to keep: real tokens, not the first of a row, the template prefix only where asked."""
    mask = attention_mask.bool().clone()
    first = mask.int().argmax(dim=1)
    pos = torch.arange(mask.shape[1])[None, :] - first[:, None]  # position within the real tokens
    mask &= pos >= 1
    mask &= (pos >= prefix_len) | keep_prefix[:, None]
    return mask


def collect(lm: LoadedModel, instructions: Sequence[str | tuple[str, str]], layers: Sequence[int], out_dir: Path, *,
            batch_size: int = 16, chunk_prompts: int = 256, prefix_every: int = 50,
            progress: bool = True) -> dict[int, torch.Tensor]:
    """Collect (or resume collecting) resid_post activations; returns {layer: (N_tokens, d) fp16}.

    An item may be (instruction, reply): the reply is appended after the template's generation prompt.
    """
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(i, "") if isinstance(i, str) else i for i in instructions]
    texts = [t + r for t, (_, r) in zip(format_chat(lm.tokenizer, [p[0] for p in pairs]), pairs)]
    prefix_len = template_prefix_length(lm.tokenizer)
    n_chunks = (len(texts) + chunk_prompts - 1) // chunk_prompts
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with tqdm(total=len(texts), desc="activations", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for c in range(n_chunks):
            path = out_dir / f"chunk_{c:05d}.safetensors"
            lo, hi = c * chunk_prompts, min(len(texts), (c + 1) * chunk_prompts)
            if not path.exists():
                acc: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
                for start in range(lo, hi, batch_size):
                    idx = list(range(start, min(hi, start + batch_size)))
                    store, batch = resid_post_batch(lm, [texts[i] for i in idx], layers)
                    keep = torch.tensor([i % prefix_every == 0 for i in idx])
                    mask = token_mask(batch["attention_mask"].cpu(), prefix_len, keep)
                    for layer in layers:
                        acc[layer].append(store[layer].cpu()[mask].to(torch.float16))
                    bar.update(len(idx))
                tensors = {f"layer_{layer}": torch.cat(acc[layer]).contiguous() for layer in layers}
                _atomic(path, lambda tmp: save_file(tensors, tmp))
            else:
                bar.update(hi - lo)
            loaded = load_file(str(path))
            for layer in layers:
                parts[layer].append(loaded[f"layer_{layer}"])
    return {layer: torch.cat(parts[layer]) for layer in layers}
