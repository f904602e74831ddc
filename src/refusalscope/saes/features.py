"""Features over several SAEs: the ``Feature`` type (layer, latent), per-layer latent maps, decoder cosines with
the refusal direction (paper, Stage 1) and which features fire on a prompt."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from refusalscope.lm.hooks import batch_context, hooked
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentAblation
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.sae import Sae

class Feature(NamedTuple):
    """One SAE latent: (layer, latent). Its one string form is "L17/1204"; ``Feature.parse`` reads it back.

    A NamedTuple, so features sort by (layer, latent), hash, and serialise to JSON as [layer, latent].
    """

    layer: int
    latent: int

    def __str__(self) -> str:
        return f"L{self.layer}/{self.latent}"

    @classmethod
    def parse(cls, text: str) -> "Feature":
        """'L17/1204' -> Feature(17, 1204)."""
        m = _FEATURE_RE.fullmatch(str(text).strip())
        if not m:
            raise ValueError(f"not a feature: {text!r} (expected e.g. 'L17/1204')")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, value) -> "Feature":
        """A Feature from a Feature, a (layer, latent) pair (e.g. a JSON list) or its string form."""
        if isinstance(value, str):
            return cls.parse(value)
        layer, latent = value
        return cls(int(layer), int(latent))


_FEATURE_RE = re.compile(r"L(\d+)/(\d+)")


def features_of(values: Iterable) -> list[Feature]:
    """Features from any mix of Feature, [layer, latent] pairs and 'L17/1204' strings, in order."""
    return [Feature.of(v) for v in values]


def feature_strings(features: Iterable) -> list[str]:
    return [str(Feature.of(f)) for f in features]


def as_latent_set(features: Iterable[Feature]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, latent in features:
        out.setdefault(int(layer), []).append(int(latent))
    return out


def decoder_cosines(saes: Mapping[int, Sae], direction: torch.Tensor) -> dict[int, torch.Tensor]:
    """cos(W_dec[i], r) for every latent of every SAE (paper, Stage 1)."""
    out = {}
    for layer, sae in saes.items():
        W = sae.W_dec.float()
        r = direction.float().flatten().to(W.device)
        out[layer] = ((W @ r) / (W.norm(dim=-1).clamp(min=1e-12) * r.norm().clamp(min=1e-12))).cpu()
    return out


def membership(candidates: Sequence[Feature], sets: Sequence[Iterable[Feature]]) -> torch.Tensor:
    """(len(sets), len(candidates)) boolean matrix: which candidates each set contains."""
    col = {f: j for j, f in enumerate(candidates)}
    out = torch.zeros(len(sets), len(candidates), dtype=torch.bool)
    for r, s in enumerate(sets):
        idx = [col[(int(layer), int(i))] for layer, i in s]
        if idx:
            out[r, idx] = True
    return out


@torch.inference_mode()
def active_features(lm: LoadedModel, prompt: str, saes: Mapping[int, Sae], features: Iterable[Feature] | None = None,
                    ablate: Iterable[Feature] = ()) -> dict[Feature, float]:
    """Max activation over the prompt's positions of ``features`` (all latents if None), optionally with a set
    ablated upstream; only features with a positive activation are returned when ``features`` is None."""
    from refusalscope.interventions.latents import LatentRecorder

    wanted = None if features is None else as_latent_set(features)
    latents = {layer_id: (None if wanted is None else wanted.get(layer_id, [])) for layer_id in saes}
    latents = {layer_id: ids for layer_id, ids in latents.items() if ids is None or len(ids)}
    rec = LatentRecorder(saes, latents)
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    ivs = [rec] if not ablate else [LatentAblation.build(saes, as_latent_set(ablate), device=lm.device), rec]
    with hooked(lm.model, hooks_for(ivs, lm.n_layers)), batch_context(batch["attention_mask"]):
        lm.model(**batch, logits_to_keep=1, use_cache=False)
    out: dict[Feature, float] = {}
    for layer, recs in rec.records.items():
        zmax = recs[0][0].amax(dim=0).float().cpu()  # (n,) max over positions
        ids = torch.arange(saes[layer].width) if latents[layer] is None else torch.as_tensor(latents[layer])
        if wanted is None:  # only the firing ones: a few dozen per token of 65k-wide SAEs, never a loop over all
            keep = torch.nonzero(zmax > 0).flatten()
            zmax, ids = zmax[keep], ids[keep]
        out.update(zip((Feature(layer, latent) for latent in ids.tolist()), zmax.tolist()))
    return out
