"""Residual-stream activations of many layers from one forward pass per batch, stored compactly for SAE training.

Tokens kept: every real (non-pad) token except each row's first (the attention sink, whose norm is ~100× the
rest). The chat template's shared prefix (e.g. Qwen's default system prompt) yields identical activations in
every prompt, so it is kept only for every ``prefix_every``-th prompt, and by default computed once per batch
(``lm.shared_prefix``) in batches of similar length; the plain left-padded forward (``share_prefix=False``) gives
the same activations up to float rounding. Chunks are fp16 safetensors files written atomically, so an interrupted
collection resumes at the first missing chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusalscope.lm.hooks import Hook, StopForward, hooked
from refusalscope.lm.inference import length_sorted_batches
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, template_prefix_length, tokenize
from refusalscope.lm.shared_prefix import prefix_forward, split_on_prefix, suffix_forward
from refusalscope.store import _atomic


def resid_recorders(layers: Sequence[int], store: dict[int, torch.Tensor], stop: bool) -> list[Hook]:
    """Hooks that keep each layer's resid_post in ``store``; with ``stop``, the forward ends after the last one."""
    last = max(layers)

    def recorder(layer):
        def edit(h):
            store[layer] = h.detach()
            if stop and layer == last:
                raise StopForward
        return edit

    return [Hook("resid_post", layer, recorder(layer)) for layer in layers]


def resid_post_batch(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], hooks: Sequence[Hook] = (),
                     full: bool = False) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """resid_post of ``layers`` for formatted ``texts`` (B, T, d) and the tokenized batch.

    Stops the forward after the last requested layer unless ``full``.
    """
    batch = tokenize(lm.tokenizer, texts, lm.device)
    store: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode(), hooked(lm.model, [*hooks, *resid_recorders(layers, store, stop=not full)]):
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


def prompt_activations(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], prefix_len: int,
                       keep_prefix: Sequence[bool], *, share_prefix: bool = True) -> dict[int, list[torch.Tensor]]:
    """Per layer, each formatted text's kept resid_post tokens (``token_mask``'s, in position order) as float16.

    With ``share_prefix`` (and a prefix every text shares) the prefix runs once and only the texts' own tokens run
    batched after its cache; otherwise one plain left-padded forward."""
    split = split_on_prefix(lm.tokenizer, texts, prefix_len, lm.device) if share_prefix else None
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    if split is None:
        store, batch = resid_post_batch(lm, texts, layers)
        mask = token_mask(batch["attention_mask"].cpu(), prefix_len, torch.tensor(list(keep_prefix)))
        for layer in layers:
            h = store[layer].cpu()
            out[layer] = [h[row][mask[row]].to(torch.float16) for row in range(len(texts))]
        return out
    head: dict[int, torch.Tensor] = {}
    cache, _ = prefix_forward(lm, split, resid_recorders(layers, head, stop=False))
    store: dict[int, torch.Tensor] = {}
    try:
        suffix_forward(lm, split, cache, resid_recorders(layers, store, stop=True))
    except StopForward:
        pass
    mask = split.mask.bool().cpu()
    for layer in layers:
        shared = head[layer][0, 1:].cpu().to(torch.float16)  # the prefix without the row's first token
        h = store[layer].cpu()
        out[layer] = [torch.cat([shared, h[row][mask[row]].to(torch.float16)]) if keep
                      else h[row][mask[row]].to(torch.float16) for row, keep in enumerate(keep_prefix)]
    return out


def collect(lm: LoadedModel, instructions: Sequence[str | tuple[str, str]], layers: Sequence[int], out_dir: Path, *,
            batch_size: int = 16, chunk_prompts: int = 256, prefix_every: int = 50, share_prefix: bool = True,
            progress: bool = True) -> dict[int, torch.Tensor]:
    """Collect (or resume collecting) resid_post activations; returns {layer: (N_tokens, d) fp16}, tokens in the
    corpus's order.

    An item may be (instruction, reply): the reply is appended after the template's generation prompt.
    ``share_prefix``: the template prefix once per batch, batches of similar length within a chunk (our choice:
    2–3× fewer tokens through the model on the default corpus; False runs the plain forward in corpus order).
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
                acc: dict[int, list[torch.Tensor | None]] = {layer: [None] * (hi - lo) for layer in layers}
                if share_prefix:
                    batches = [[lo + r for r in rows]
                               for rows in length_sorted_batches(texts[lo:hi], lm.tokenizer, batch_size)]
                else:
                    batches = [list(range(s, min(hi, s + batch_size))) for s in range(lo, hi, batch_size)]
                for idx in batches:
                    acts = prompt_activations(lm, [texts[i] for i in idx], layers, prefix_len,
                                              [i % prefix_every == 0 for i in idx], share_prefix=share_prefix)
                    for layer in layers:
                        for i, a in zip(idx, acts[layer]):
                            acc[layer][i - lo] = a
                    bar.update(len(idx))
                tensors = {f"layer_{layer}": torch.cat(acc[layer]).contiguous() for layer in layers}  # type: ignore[arg-type]
                _atomic(path, lambda tmp: save_file(tensors, tmp))
            else:
                bar.update(hi - lo)
            loaded = load_file(str(path))
            for layer in layers:
                parts[layer].append(loaded[f"layer_{layer}"])
    return {layer: torch.cat(parts[layer]) for layer in layers}
