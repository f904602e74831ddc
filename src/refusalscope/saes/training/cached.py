"""Train (or reuse) an SAE set for a model that has none, and measure SAE quality on held-out chat text.

``train_sae_set`` collects resid_post activations of every requested layer in one pass over a corpus of
chat-formatted instructions (never the evaluation prompts), trains one TopK SAE per layer and caches each under
``<cache>/saes/<model>/<key>/layer_<l>`` keyed by model, layer and every option that changes the result, so a
rerun (or a crash mid-way) redoes only the missing layers. ``evaluate_sae_set`` reports per layer the fraction of
variance unexplained, L0, the dead-latent fraction and the CE-loss increase when the reconstruction replaces the
residual stream (no error term).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.saes.training.activations import collect, resid_post_batch, template_prefix_length, token_mask
from refusalscope.lm.hooks import Hook, hooked
from refusalscope.lm.loading import LoadedModel, cache_root
from refusalscope.lm.prompts import format_chat
from refusalscope.saes.sae import Sae, load_sae_dir, save_sae
from refusalscope.saes.training.topk import TrainConfig, train_topk

log = logging.getLogger("refusalscope")
FORMAT_VERSION = 1  # bump when training changes in a way that should invalidate cached SAEs


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sae_cache_dir(model_name: str, key: dict) -> Path:
    return cache_root() / "saes" / model_name.replace("/", "--") / _key(key)


def max_norm_for(x: torch.Tensor, factor: float) -> float:
    """``factor`` × the median token norm: larger norms are attention-sink tokens outside the SAE's domain."""
    return float(x.float().norm(dim=-1).median()) * factor


def train_sae_set(lm: LoadedModel, layers: Sequence[int], corpus: Sequence[str], cfg: TrainConfig, *,
                  corpus_id: str, norm_factor: float = 4.0, replies: int = 0, batch_size: int = 16,
                  device: str | None = None, progress: bool = True) -> tuple[Path, dict[int, Sae], dict]:
    """Train the layers whose SAE is not cached yet; returns (set directory, {layer: Sae}, info)."""
    model_key = {"model": lm.name, "source": str(lm.source), "corpus": corpus_id, "n": len(corpus),
                 "replies": replies, "v": FORMAT_VERSION}
    cfg_key = {**model_key, "width": cfg.width, "k": cfg.k, "epochs": cfg.epochs, "batch": cfg.batch_size,
               "lr": cfg.lr, "aux_k": cfg.aux_k, "seed": cfg.seed, "norm_factor": norm_factor}
    set_dir = sae_cache_dir(lm.name, cfg_key)
    todo = [l for l in layers if not (set_dir / f"layer_{l}" / "cfg.json").is_file()]
    info: dict = {"set_dir": str(set_dir), "trained": todo, "reused": [l for l in layers if l not in todo],
                  "seconds": {}}
    if todo:
        t0 = time.perf_counter()
        acts_dir = cache_root() / "activations" / lm.name.replace("/", "--") / _key({**model_key, "layers": todo})
        texts = list(corpus)
        if replies:
            from refusalscope.lm.inference import generate

            outs = generate(lm, texts, max_new_tokens=replies, batch_size=batch_size, desc="replies",
                            progress=progress)
            texts = [(t, o) for t, o in zip(texts, outs)]
        acts = collect(lm, texts, todo, acts_dir, batch_size=batch_size, progress=progress)
        info["seconds"]["collect"] = time.perf_counter() - t0
        info["tokens"] = int(next(iter(acts.values())).shape[0])
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for layer in todo:
            t1 = time.perf_counter()
            x = acts.pop(layer)
            limit = max_norm_for(x, norm_factor)
            x = x[x.float().norm(dim=-1) <= limit]
            with tqdm(total=1, desc=f"SAE layer {layer}", disable=not progress, dynamic_ncols=True) as bar:
                def on_step(step, total, fvu):
                    bar.total = total
                    bar.n = step
                    bar.set_postfix(fvu=f"{fvu:.3f}")
                    bar.refresh()
                sae, tlog = train_topk(x, layer, cfg, device=dev, on_step=on_step)
            sae = Sae(**{**sae.__dict__, "max_norm": limit, "source": str(set_dir / f"layer_{layer}")})
            save_sae(sae, set_dir / f"layer_{layer}", model_name=lm.name,
                     extra_metadata={"refusalscope_train": {**cfg_key, "layer": layer, "tokens": int(x.shape[0]),
                                                            "final_train_fvu": tlog["trace"][-1]["fvu"]}})
            info["seconds"][f"layer_{layer}"] = time.perf_counter() - t1
        info["seconds"]["total"] = time.perf_counter() - t0
    saes = {l: load_sae_dir(set_dir / f"layer_{l}") for l in layers}
    return set_dir, saes, info


@torch.inference_mode()
def evaluate_sae_set(lm: LoadedModel, saes: dict[int, Sae], instructions: Sequence[str], *, batch_size: int = 16,
                     ce: bool = True, progress: bool = True) -> pd.DataFrame:
    """Per layer: FVU, L0, dead fraction on in-domain held-out tokens; CE-loss increase with the reconstruction
    spliced in at those tokens (sink tokens, outside the SAE's domain, keep their activations)."""
    layers = sorted(saes)
    dev_saes = {l: s.to(lm.device, torch.float32) for l, s in saes.items()}
    texts = format_chat(lm.tokenizer, instructions)
    prefix_len = template_prefix_length(lm.tokenizer)
    stats = {l: {"sse": 0.0, "sq": 0.0, "sum": torch.zeros(saes[l].d_in, dtype=torch.float64), "n": 0, "l0": 0.0,
                 "fired": torch.zeros(saes[l].width, dtype=torch.bool), "ce": 0.0} for l in layers}
    ce_clean, ce_tokens = 0.0, 0
    steps = len(range(0, len(texts), batch_size)) * (1 + (len(layers) if ce else 0))
    bar = tqdm(total=steps, desc="SAE eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        store, batch = resid_post_batch(lm, chunk, layers)
        keep = token_mask(batch["attention_mask"].cpu(), prefix_len, torch.zeros(len(chunk), dtype=torch.bool))
        for l in layers:
            h = store[l].float()
            sae = dev_saes[l]
            dom = keep.to(h.device)
            if sae.max_norm is not None:
                dom &= h.norm(dim=-1) <= sae.max_norm
            x = h[dom]
            z = sae.encode(x)
            s = stats[l]
            s["sse"] += float((x - sae.decode(z)).pow(2).sum())
            s["sq"] += float(x.double().pow(2).sum())
            s["sum"] += x.double().sum(0).cpu()
            s["n"] += x.shape[0]
            s["l0"] += float((z > 0).sum())
            s["fired"] |= (z > 0).any(0).cpu()
        bar.update(1)
        if not ce:
            continue
        ids, am = batch["input_ids"], batch["attention_mask"]
        target_mask = keep[:, 1:].to(ids.device)  # predict tokens after the template prefix

        def token_ce(hooks):
            with hooked(lm.model, hooks):
                logits = lm.model(**batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            return float(nll[target_mask].sum())

        ce_clean += token_ce([])
        ce_tokens += int(target_mask.sum())
        bar.update(1)
        for l in layers:
            sae = dev_saes[l]

            def splice(h, sae=sae):
                z = sae.encode(h.float())
                dom = (sae.max_norm is None) or (h.float().norm(dim=-1, keepdim=True) <= sae.max_norm)
                return torch.where(torch.as_tensor(dom, device=h.device), sae.decode(z).to(h.dtype), h)

            stats[l]["ce"] += token_ce([Hook("resid_post", l, splice)])
            bar.update(1)
    bar.close()
    rows = []
    for l in layers:
        s = stats[l]
        n = max(s["n"], 1)
        total_var = s["sq"] - float(s["sum"].pow(2).sum()) / n
        rows.append({"layer": l, "fvu": s["sse"] / max(total_var, 1e-12), "l0": s["l0"] / n,
                     "dead_frac": 1 - float(s["fired"].float().mean()), "tokens": s["n"],
                     "ce_clean": ce_clean / max(ce_tokens, 1) if ce else float("nan"),
                     "ce_increase": (s["ce"] - ce_clean) / max(ce_tokens, 1) if ce else float("nan")})
    return pd.DataFrame(rows)
