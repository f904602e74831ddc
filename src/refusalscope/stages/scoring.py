"""P(refusal) under latent ablation: the one batched scoring primitive of Stages 2 and 3.

P(refusal token | prompt, model with set A ablated) at the last prompt position, for many sets A of one prompt,
one forward per chunk of sets (paper, Eq. 1's P(p, A); the refusal tokens are "I" by default).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch

from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentAblation
from refusalscope.lm.hooks import batch_context, hooked, replayed_layers
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature, as_latent_set, membership
from refusalscope.saes.sae import Sae


@torch.inference_mode()
def clean_prefix_length(model: torch.nn.Module, n_layers: int, batch: Mapping[str, torch.Tensor],
                        saes: Mapping[int, Sae], candidates: Sequence[Feature]) -> int:
    """Leading positions where no candidate latent fires in the clean run (capped at T − 1).

    Ablating any subset of the candidates leaves these positions exactly as in the clean run: the edit there is
    −z_S W_dec = 0 at every layer (by induction over layers, since attention is causal). So their keys and
    values can be computed once and shared by every ablated set.
    """
    from refusalscope.interventions.latents import LatentRecorder

    rec = LatentRecorder(saes, as_latent_set(candidates))
    with hooked(model, rec.hooks(n_layers)), batch_context(batch["attention_mask"]):
        model(**batch, logits_to_keep=1, use_cache=False)
    T = batch["input_ids"].shape[1]
    active = torch.zeros(T, dtype=torch.bool)
    for recs in rec.records.values():
        active |= (recs[0][0] > 0).any(-1)
    first = int(active.nonzero()[0]) if active.any() else T
    return min(first, T - 1)


@torch.inference_mode()
def refusal_probs_for_batch(model: torch.nn.Module, n_layers: int, batch: Mapping[str, torch.Tensor],
                            token_ids: Sequence[int], saes: Mapping[int, Sae], candidates: Sequence[Feature],
                            member: torch.Tensor, *, batch_size: int = 32, fast: bool = True,
                            share: str = "auto") -> torch.Tensor:
    """P(refusal tokens) at the last position of one tokenized prompt (1, T), float64, one value per row of
    ``member`` (R, len(candidates)): the row's marked candidates are ablated.

    Work that every row shares can be done once (``share``; "auto" picks whichever saves more):
    - "positions": the leading positions no candidate touches (``clean_prefix_length``) run once and their
      key/value cache is shared by every row (fewer tokens per row);
    - "layers": the layers below the lowest candidate layer run once and are replayed (``hooks.replayed_layers``);
    - "none": every row runs the whole forward.
    All give the same result, up to float rounding that depends on batch shapes.
    """
    if share not in ("auto", "positions", "layers", "none"):
        raise ValueError(f"share must be auto, positions, layers or none, not {share!r}")
    device = batch["input_ids"].device
    ids = torch.as_tensor(list(token_ids), device=device)
    out = torch.empty(member.shape[0], dtype=torch.float64)
    if not len(candidates):
        member = torch.zeros(member.shape[0], 0, dtype=torch.bool)
    p0, cache, frozen = 0, None, 0
    if share != "none" and len(candidates) and member.shape[0] > 1:
        T = batch["input_ids"].shape[1]
        low = min(int(layer) for layer, _ in candidates)
        if share != "layers":
            p0 = clean_prefix_length(model, n_layers, batch, saes, candidates)
        if p0 > 0 and (share == "positions" or p0 / T >= low / n_layers):
            cache = model(input_ids=batch["input_ids"][:, :p0], attention_mask=batch["attention_mask"][:, :p0],
                          use_cache=True, logits_to_keep=1).past_key_values
        elif share != "positions":
            p0, frozen = 0, low
    with replayed_layers(model, dict(batch), frozen):
        for start in range(0, member.shape[0], batch_size):
            chunk = member[start:start + batch_size].to(device)
            rows = {k: v.expand(chunk.shape[0], -1) for k, v in batch.items()}
            ivs = [LatentAblation.from_membership(saes, candidates, chunk, fast=fast)] if len(candidates) else []
            with hooked(model, hooks_for(ivs, n_layers)), batch_context(rows["attention_mask"]):
                if cache is None:
                    logits = model(**rows, logits_to_keep=1, use_cache=False).logits[:, -1].float()
                else:
                    past = copy.deepcopy(cache)
                    past.batch_repeat_interleave(chunk.shape[0])
                    logits = model(input_ids=rows["input_ids"][:, p0:], attention_mask=rows["attention_mask"],
                                   past_key_values=past, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            out[start:start + chunk.shape[0]] = torch.softmax(logits, dim=-1)[:, ids].sum(-1).double().cpu()
    return out


def refusal_probs(lm: LoadedModel, prompt: str, saes: Mapping[int, Sae], sets: Sequence[Iterable[Feature]], *,
                  batch_size: int = 32, fast: bool = True, candidates: Sequence[Feature] | None = None,
                  member: torch.Tensor | None = None) -> torch.Tensor:
    """P(refusal token) at the last prompt position with each set ablated, (len(sets),) float64.

    Sets can be given as lists, or as ``candidates`` + a boolean ``member`` matrix (then ``sets`` is ignored).
    The refusal probability sums the probabilities of the model's refusal tokens ("I" by default).
    """
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    if member is None:
        candidates = sorted({(int(layer), int(i)) for s in sets for layer, i in s})
        member = membership(candidates, sets)
    return refusal_probs_for_batch(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, candidates, member,
                                   batch_size=batch_size, fast=fast)
