"""SAE quality on held-out chat text (paper, "Sparse Autoencoders"): fraction of variance unexplained, L0, the
dead-latent fraction, and the CE-loss increase when the reconstruction replaces the residual stream (no error
term)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.lm.hooks import Hook, StopForward, hooked
from refusalscope.lm.inference import length_sorted_batches
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, template_prefix_length
from refusalscope.lm.shared_prefix import prefix_forward, split_on_prefix, suffix_forward
from refusalscope.saes.placement import choose_placement
from refusalscope.saes.sae import Sae
from refusalscope.saes.training.activations import resid_recorders, resid_post_batch, token_mask


class _HeldOutBatch:
    """One batch of held-out prompts, run plainly (left-padded) or after the shared prefix's cache: its in-domain
    tokens' resid_post at the SAE layers, and the summed next-token NLL of the tokens after the template prefix."""

    def __init__(self, lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], prefix_len: int,
                 share_prefix: bool):
        self.lm, self.layers = lm, list(layers)
        self.split = split_on_prefix(lm.tokenizer, texts, prefix_len, lm.device) if share_prefix else None
        if self.split is None:
            store, self.batch = resid_post_batch(lm, texts, self.layers)
            keep = token_mask(self.batch["attention_mask"].cpu(), prefix_len,
                              torch.zeros(len(texts), dtype=torch.bool)).to(lm.device)
            self.target_mask = keep[:, 1:]  # predict tokens after the template prefix
        else:
            store = {}
            cache, _ = prefix_forward(self.lm, self.split)
            try:
                suffix_forward(lm, self.split, cache, resid_recorders(self.layers, store, stop=True))
            except StopForward:
                pass
            keep = self.split.mask.bool()
        self.hidden = {layer: store[layer][keep].float() for layer in self.layers}

    @property
    def n_targets(self) -> int:
        return int(self.target_mask.sum()) if self.split is None else int(self.split.mask.sum())

    def nll(self, hooks: Sequence[Hook] = ()) -> float:
        if self.split is None:
            ids = self.batch["input_ids"]
            with hooked(self.lm.model, hooks):
                logits = self.lm.model(**self.batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return float(nll[self.target_mask].sum())
        cache, last = prefix_forward(self.lm, self.split, hooks, logits=True)
        logits = suffix_forward(self.lm, self.split, cache, hooks, logits=True)
        # the first own token is predicted at the prefix's last position
        pred = torch.cat([last[:, None].expand(logits.shape[0], 1, -1), logits[:, :-1]], dim=1)
        nll = torch.nn.functional.cross_entropy(pred.transpose(1, 2), self.split.suffix, reduction="none")
        return float(nll[self.split.mask.bool()].sum())


@torch.inference_mode()
def evaluate_sae_set(lm: LoadedModel, saes: dict[int, Sae], instructions: Sequence[str], *, batch_size: int = 16,
                     ce: bool = True, share_prefix: bool = True, progress: bool = True) -> pd.DataFrame:
    """Per layer: FVU, L0, dead fraction on in-domain held-out tokens; CE-loss increase with the reconstruction
    spliced in at those tokens (sink tokens, outside the SAE's domain, keep their activations).

    ``share_prefix``: the template prefix once per batch, batches of similar length (the plain left-padded forward
    in input order otherwise; the same report up to float rounding)."""
    layers = sorted(saes)
    # a set that fits the model's device goes there once; a larger one (held in host memory, or in bfloat16) comes
    # over one layer at a time, as float32
    whole = choose_placement(saes, lm.device) == "device" and all(s.W_enc.dtype == torch.float32
                                                                   for s in saes.values())
    dev_saes = {layer: s.to(lm.device, torch.float32) for layer, s in saes.items()} if whole else None

    def on_device(layer: int) -> Sae:
        return dev_saes[layer] if dev_saes is not None else saes[layer].on(lm.device)

    texts = format_chat(lm.tokenizer, instructions)
    prefix_len = template_prefix_length(lm.tokenizer)
    stats = {layer: {"sse": 0.0, "sq": 0.0, "sum": torch.zeros(saes[layer].d_in, dtype=torch.float64), "n": 0,
                     "l0": 0.0,
                 "fired": torch.zeros(saes[layer].width, dtype=torch.bool), "ce": 0.0} for layer in layers}
    ce_clean, ce_tokens = 0.0, 0
    if share_prefix:
        batches = list(length_sorted_batches(texts, lm.tokenizer, batch_size))
    else:
        batches = [list(range(s, min(len(texts), s + batch_size))) for s in range(0, len(texts), batch_size)]
    # per batch: the reconstruction statistics, then (with CE) the clean forward and one spliced forward per layer
    steps = len(batches) * (1 + (1 + len(layers) if ce else 0))
    bar = tqdm(total=steps, desc="SAE eval", disable=not progress, dynamic_ncols=True)
    for rows in batches:
        held = _HeldOutBatch(lm, [texts[i] for i in rows], layers, prefix_len, share_prefix)
        for layer in layers:
            h = held.hidden[layer]
            sae = on_device(layer)
            x = h if sae.max_norm is None else h[h.norm(dim=-1) <= sae.max_norm]
            z = sae.encode(x)
            s = stats[layer]
            s["sse"] += float((x - sae.decode(z)).pow(2).sum())
            s["sq"] += float(x.double().pow(2).sum())
            s["sum"] += x.double().sum(0).cpu()
            s["n"] += x.shape[0]
            s["l0"] += float((z > 0).sum())
            s["fired"] |= (z > 0).any(0).cpu()
        bar.update(1)
        if not ce:
            continue
        ce_clean += held.nll()
        ce_tokens += held.n_targets
        bar.update(1)
        for layer in layers:
            sae = on_device(layer)

            def splice(h, sae=sae):
                z = sae.encode(h.float())
                dom = (sae.max_norm is None) or (h.float().norm(dim=-1, keepdim=True) <= sae.max_norm)
                return torch.where(torch.as_tensor(dom, device=h.device), sae.decode(z).to(h.dtype), h)

            stats[layer]["ce"] += held.nll([Hook("resid_post", layer, splice)])
            bar.update(1)
    bar.close()
    rows = []
    for layer in layers:
        s = stats[layer]
        n = max(s["n"], 1)
        total_var = s["sq"] - float(s["sum"].pow(2).sum()) / n
        rows.append({"layer": layer, "fvu": s["sse"] / max(total_var, 1e-12), "l0": s["l0"] / n,
                     "dead_frac": 1 - float(s["fired"].float().mean()), "tokens": s["n"],
                     "ce_clean": ce_clean / max(ce_tokens, 1) if ce else float("nan"),
                     "ce_increase": (s["ce"] - ce_clean) / max(ce_tokens, 1) if ce else float("nan")})
    return pd.DataFrame(rows)
