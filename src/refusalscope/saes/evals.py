"""SAE quality on held-out chat text (paper, "Sparse Autoencoders"): fraction of variance unexplained, L0, the
dead-latent fraction, and the CE-loss increase when the reconstruction replaces the residual stream (no error
term)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.lm.hooks import Hook, hooked
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat
from refusalscope.saes.placement import choose_placement
from refusalscope.saes.sae import Sae
from refusalscope.saes.training.activations import resid_post_batch, template_prefix_length, token_mask


@torch.inference_mode()
def evaluate_sae_set(lm: LoadedModel, saes: dict[int, Sae], instructions: Sequence[str], *, batch_size: int = 16,
                     ce: bool = True, progress: bool = True) -> pd.DataFrame:
    """Per layer: FVU, L0, dead fraction on in-domain held-out tokens; CE-loss increase with the reconstruction
    spliced in at those tokens (sink tokens, outside the SAE's domain, keep their activations)."""
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
    # per batch: the reconstruction statistics, then (with CE) the clean forward and one spliced forward per layer
    steps = len(range(0, len(texts), batch_size)) * (1 + (1 + len(layers) if ce else 0))
    bar = tqdm(total=steps, desc="SAE eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        store, batch = resid_post_batch(lm, chunk, layers)
        keep = token_mask(batch["attention_mask"].cpu(), prefix_len, torch.zeros(len(chunk), dtype=torch.bool))
        for layer in layers:
            h = store[layer].float()
            sae = on_device(layer)
            dom = keep.to(h.device)
            if sae.max_norm is not None:
                dom &= h.norm(dim=-1) <= sae.max_norm
            x = h[dom]
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
        ids = batch["input_ids"]
        target_mask = keep[:, 1:].to(ids.device)  # predict tokens after the template prefix

        def token_ce(hooks):
            with hooked(lm.model, hooks):
                logits = lm.model(**batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return float(nll[target_mask].sum())

        ce_clean += token_ce([])
        ce_tokens += int(target_mask.sum())
        bar.update(1)
        for layer in layers:
            sae = on_device(layer)

            def splice(h, sae=sae):
                z = sae.encode(h.float())
                dom = (sae.max_norm is None) or (h.float().norm(dim=-1, keepdim=True) <= sae.max_norm)
                return torch.where(torch.as_tensor(dom, device=h.device), sae.decode(z).to(h.dtype), h)

            stats[layer]["ce"] += token_ce([Hook("resid_post", layer, splice)])
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
