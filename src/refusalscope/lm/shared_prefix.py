"""Forwards of chat prompts that share the template's prefix: the prefix once (one row), its key/value cache
repeated over the batch, then only each prompt's own tokens.

Qwen2.5's default system prompt is 24 of a corpus prompt's ~41 tokens, the same in every prompt, so a plain
left-padded forward spends over half its work on it (more with padding). Splitting it off changes each value by
float rounding only (other matrix shapes), as the tests check against the plain forward for Qwen2, Llama and
Gemma-2. That rests on rotary (relative) positions: the plain forward shifts each left-padded row's positions by its
padding, which only relative positions ignore. Hooks see the prefix forward as a (1, P, d) call and the suffix
forward as (B, S, d); the suffix is right-padded, so a row's real tokens come first and sit at the positions they
have in the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusalscope.lm.hooks import Hook, hooked
from refusalscope.lm.loading import LoadedModel, cache_argument, returned_cache


@dataclass(frozen=True)
class PrefixBatch:
    """A batch split at the shared prefix: ``prefix`` (1, P) ids, ``suffix`` (B, S) ids right-padded, ``mask``
    (B, S) 1 on each row's real suffix tokens."""

    prefix: torch.Tensor
    suffix: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Each row's own (suffix) token count, (B,)."""
        return self.mask.sum(1)

    def from_end(self, offsets) -> torch.Tensor | None:
        """Suffix indices (B, n) of negative ``offsets`` counted from each row's end (``offsets=[-1]``: its last
        token); None when an offset reaches back into the prefix for some row, or is not negative."""
        offsets = torch.as_tensor(list(offsets), dtype=torch.long, device=self.mask.device)
        idx = self.lengths[:, None] + offsets[None, :]
        return idx if bool((offsets < 0).all()) and bool((idx >= 0).all()) else None

    @property
    def full_mask(self) -> torch.Tensor:
        """The attention mask of the suffix forward: the prefix, then each row's real tokens."""
        ones = torch.ones(self.suffix.shape[0], self.prefix.shape[1], dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([ones, self.mask], dim=1)


def split_on_prefix(tokenizer, texts: Sequence[str], prefix_len: int,
                    device: torch.device | str = "cpu") -> PrefixBatch | None:
    """Tokenize formatted ``texts`` and split off their first ``prefix_len`` tokens; None when there is no prefix
    or any text's first tokens differ from the first text's (then use the plain forward)."""
    if prefix_len < 1 or not texts:
        return None
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    head = ids[0][:prefix_len]
    if any(len(i) <= prefix_len or i[:prefix_len] != head for i in ids):
        return None
    width = max(len(i) for i in ids) - prefix_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    suffix = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, i in enumerate(ids):
        suffix[row, :len(i) - prefix_len] = torch.tensor(i[prefix_len:])
        mask[row, :len(i) - prefix_len] = 1
    return PrefixBatch(torch.tensor([head]).to(device), suffix.to(device), mask.to(device))


def prefix_forward(lm: LoadedModel, batch: PrefixBatch, hooks: Sequence[Hook] = (), *,
                   logits: bool = False) -> tuple[object, torch.Tensor | None]:
    """The whole prefix, one row: (its key/value cache repeated to the batch's rows, its last position's float32
    logits (1, V) when ``logits``)."""
    with torch.inference_mode(), hooked(lm.model, hooks):
        out = lm.model(input_ids=batch.prefix, use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(batch.suffix.shape[0])
    return cache, (out.logits[:, -1].float() if logits else None)


def suffix_forward(lm: LoadedModel, batch: PrefixBatch, cache, hooks: Sequence[Hook] = (), *,
                   logits: bool = False) -> torch.Tensor | None:
    """Each row's own tokens after the prefix's cache (which it extends: use it once); float32 logits (B, S, V)
    when ``logits``. A hook may stop the forward early (``StopForward``); the caller catches it."""
    with torch.inference_mode(), hooked(lm.model, hooks):
        out = lm.model(input_ids=batch.suffix, attention_mask=batch.full_mask, use_cache=True,
                       logits_to_keep=0 if logits else 1, **{cache_argument(lm.model): cache})
    return out.logits.float() if logits else None


def suffix_last_logits(lm: LoadedModel, batch: PrefixBatch, cache, hooks: Sequence[Hook] = ()) -> torch.Tensor:
    """Float32 logits (B, V) at each row's last real token: ``suffix_forward`` with the output head handed each
    row's last position only (rows end at different suffix positions: right padding), by a gather in front of the
    head that is removed afterwards."""
    last = batch.from_end([-1])[:, 0]
    rows = torch.arange(len(last), device=last.device)
    handle = lm.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (args[0][rows, last][:, None], *args[1:]))
    try:
        return suffix_forward(lm, batch, cache, hooks, logits=True)[:, -1]
    finally:
        handle.remove()
