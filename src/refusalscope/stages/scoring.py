"""P(refusal) under latent ablation: the one batched scoring primitive of Stages 2 and 3.

P(refusal token | prompt, model with set A ablated) at the last prompt position, for many sets A of one prompt,
one forward per chunk of sets (paper, Eq. 1's P(p, A); the refusal tokens are "I" by default).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch

from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import CandidatePlans, LatentAblation
from refusalscope.interventions.shared_rows import SharedRowAblation
from refusalscope.lm.compiled_layers import compiled_layers
from refusalscope.lm.hooks import batch_context, hooked, layer_outputs, replaying
from refusalscope.lm.loading import LoadedModel, cache_argument, returned_cache
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


class SetScorer:
    """P(refusal tokens) at the last position of one tokenized prompt (1, T) under many ablated subsets of one
    candidate list (float64, one value per row of a (R, len(candidates)) membership matrix).

    What every set shares is prepared once, at construction, and reused by every call (``share``; "auto" picks
    whichever saves more):
    - "positions": the leading positions no candidate touches (``clean_prefix_length``) run once and their
      key/value cache is shared by every row (fewer tokens per row);
    - "layers": the layers below the lowest candidate layer run once and are replayed (``hooks.replaying``);
    - "none": every set runs the whole forward in a row of its own (the plain form the others are tested against).
    Unless a key/value cache is shared or ``share`` is "none", sets also share rows while they agree on the
    latents that fired (``share_rows``, ``interventions.shared_rows``): a chain step costs a row only from its
    block's first firing layer. All give the same result, up to float rounding that depends on batch shapes. The
    candidates' SAE columns are sliced (and moved to the model's device) once, too.

    ``compile``: the decoder layers of the scoring forwards run compiled (``lm.compiled_layers``; a mode of
    ``lm.compiled.MODES``), except with a shared key/value cache; the same P up to float rounding.
    """

    def __init__(self, model: torch.nn.Module, n_layers: int, batch: Mapping[str, torch.Tensor],
                 token_ids: Sequence[int], saes: Mapping[int, Sae], candidates: Sequence[Feature], *,
                 batch_size: int = 32, fast: bool = True, share: str = "auto", share_rows: bool = True,
                 compile: str = "off"):
        if share not in ("auto", "positions", "layers", "none"):
            raise ValueError(f"share must be auto, positions, layers or none, not {share!r}")
        self.model, self.n_layers, self.batch = model, n_layers, dict(batch)
        self.device = batch["input_ids"].device
        self.ids = torch.as_tensor(list(token_ids), device=self.device)
        self.n, self.batch_size, self.fast = len(candidates), batch_size, fast
        self.plans = CandidatePlans.build(saes, candidates, self.device) if len(candidates) else None
        self.p0, self.cache, self.outs = 0, None, {}
        self.rows_scored = 0  # sets run through the model so far (what a caller's savings are measured in)
        self.share_rows = share_rows and share != "none"
        self.compile = compile
        self.layer_rows = [0, 0]  # rows computed at the ablated layers: with row sharing, without it
        if share != "none" and len(candidates):
            T = batch["input_ids"].shape[1]
            low = min(int(layer) for layer, _ in candidates)
            p0 = clean_prefix_length(model, n_layers, batch, saes, candidates) if share != "layers" else 0
            # our choice: with shared rows "auto" takes the cache only if it skips at least half the prompt, since
            # shared rows alone saved 35-40 % of the rows on the default model (benchmarks/RESULTS.md)
            cached = p0 / T >= low / n_layers and (not self.share_rows or p0 / T >= 0.5)
            if p0 > 0 and (share == "positions" or cached):
                self.p0 = p0
                with torch.inference_mode():
                    self.cache = returned_cache(model(input_ids=batch["input_ids"][:, :p0],
                                                      attention_mask=batch["attention_mask"][:, :p0],
                                                      use_cache=True, logits_to_keep=1))
            elif share != "positions":
                self.outs = layer_outputs(model, self.batch, low)

    @property
    def shares_rows(self) -> bool:
        """Whether sets share rows (not with a shared key/value cache, whose batch is fixed)."""
        return self.plans is not None and self.cache is None and self.share_rows

    @torch.inference_mode()
    def __call__(self, member: torch.Tensor, fired: bool = False):
        """P per row of ``member``; with ``fired``, also (R, n) bool: which of the row's ablated candidates fired
        (z > 0 at some position) in that row's forward."""
        out = torch.empty(member.shape[0], dtype=torch.float64)
        fired_out = torch.zeros(member.shape[0], self.n, dtype=torch.bool)
        # our choice: not with a shared key/value cache, whose update dynamo would trace per cache object
        mode = self.compile if self.cache is None else "off"
        with replaying(self.model, self.outs), compiled_layers(self.model, mode):
            for start in range(0, member.shape[0], self.batch_size):
                chunk = member[start:start + self.batch_size].to(self.device)
                sink: dict[int, list[torch.Tensor]] | None = {} if fired else None
                if self.shares_rows:
                    p = self._shared_rows(chunk, sink)
                else:
                    p = self._one_row_per_set(chunk, sink)
                out[start:start + chunk.shape[0]] = p.double().cpu()
                if sink and self.plans is not None:
                    fired_out[start:start + chunk.shape[0]] = self.plans.fired_columns(
                        {layer: torch.cat(parts) for layer, parts in sink.items()})
                self.rows_scored += chunk.shape[0]
        return (out, fired_out) if fired else out

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[:, -1].float(), dim=-1)[:, self.ids].sum(-1)

    def _one_row_per_set(self, chunk: torch.Tensor, sink) -> torch.Tensor:
        rows = {k: v.expand(chunk.shape[0], -1) for k, v in self.batch.items()}
        ivs = [LatentAblation(self.plans.for_rows(chunk), True, None, self.fast, fired=sink)] \
            if self.plans is not None else []
        with hooked(self.model, hooks_for(ivs, self.n_layers)), batch_context(rows["attention_mask"]):
            if self.cache is None:
                logits = self.model(**rows, logits_to_keep=1, use_cache=False).logits
            else:
                past = copy.deepcopy(self.cache)
                past.batch_repeat_interleave(chunk.shape[0])
                logits = self.model(input_ids=rows["input_ids"][:, self.p0:], attention_mask=rows["attention_mask"],
                                    **{cache_argument(self.model): past}, use_cache=True, logits_to_keep=1).logits
        if self.plans is not None:
            self.layer_rows = [n + chunk.shape[0] * len(self.plans.plans) for n in self.layer_rows]
        return self._probs(logits)

    def _shared_rows(self, chunk: torch.Tensor, sink) -> torch.Tensor:
        iv = SharedRowAblation(self.plans.for_rows(chunk), chunk.shape[0], self.fast, fired=sink)
        inputs = dict(self.batch)
        if bool(inputs["attention_mask"].all()):  # one unpadded prompt: no mask whose batch attention code could
            inputs.pop("attention_mask")  # compare with the growing batch (flash attention unpads by the mask)
        with hooked(self.model, iv.hooks(self.n_layers)), batch_context(self.batch["attention_mask"]):
            logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits
        self.layer_rows[0] += sum(iv.computed)
        self.layer_rows[1] += chunk.shape[0] * len(iv.computed)
        return self._probs(logits)[iv.rows.to(logits.device)]


def batch_scorer(model: torch.nn.Module, n_layers: int, batch: Mapping[str, torch.Tensor], token_ids: Sequence[int],
                 saes: Mapping[int, Sae], candidates: Sequence[Feature], rows: int, *, batch_size: int = 32,
                 fast: bool = True, share: str = "auto", share_rows: bool = True, compile: str = "off") -> SetScorer:
    """A ``SetScorer`` for one call of ``rows`` sets: shared work only when there is more than one row (one row
    has nothing to share it with)."""
    if share not in ("auto", "positions", "layers", "none"):
        raise ValueError(f"share must be auto, positions, layers or none, not {share!r}")
    return SetScorer(model, n_layers, batch, token_ids, saes, candidates, batch_size=batch_size, fast=fast,
                     share=share if rows > 1 else "none", share_rows=share_rows, compile=compile)


def refusal_probs_for_batch(model: torch.nn.Module, n_layers: int, batch: Mapping[str, torch.Tensor],
                            token_ids: Sequence[int], saes: Mapping[int, Sae], candidates: Sequence[Feature],
                            member: torch.Tensor, *, batch_size: int = 32, fast: bool = True,
                            share: str = "auto", share_rows: bool = True, compile: str = "off") -> torch.Tensor:
    """P(refusal tokens) at the last position of one tokenized prompt (1, T), float64, one value per row of
    ``member`` (R, len(candidates)): the row's marked candidates are ablated (``batch_scorer`` for one call)."""
    return batch_scorer(model, n_layers, batch, token_ids, saes, candidates, member.shape[0], batch_size=batch_size,
                        fast=fast, share=share, share_rows=share_rows, compile=compile)(member)


def prompt_scorer(lm: LoadedModel, prompt: str, saes: Mapping[int, Sae], candidates: Sequence[Feature], *,
                  batch_size: int = 32, fast: bool = True, share: str = "auto",
                  share_rows: bool = True, compile: str = "off") -> SetScorer:
    """A ``SetScorer`` of one chat-formatted prompt with the model's refusal tokens."""
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    return SetScorer(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, candidates, batch_size=batch_size,
                     fast=fast, share=share, share_rows=share_rows, compile=compile)


def refusal_probs(lm: LoadedModel, prompt: str, saes: Mapping[int, Sae], sets: Sequence[Iterable[Feature]], *,
                  batch_size: int = 32, fast: bool = True, candidates: Sequence[Feature] | None = None,
                  member: torch.Tensor | None = None, share_rows: bool = True,
                  compile: str = "off") -> torch.Tensor:
    """P(refusal token) at the last prompt position with each set ablated, (len(sets),) float64.

    Sets can be given as lists, or as ``candidates`` + a boolean ``member`` matrix (then ``sets`` is ignored).
    The refusal probability sums the probabilities of the model's refusal tokens ("I" by default).
    """
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    if member is None:
        candidates = sorted({(int(layer), int(i)) for s in sets for layer, i in s})
        member = membership(candidates, sets)
    return refusal_probs_for_batch(lm.model, lm.n_layers, batch, lm.refusal_token_ids(), saes, candidates, member,
                                   batch_size=batch_size, fast=fast, share_rows=share_rows, compile=compile)
