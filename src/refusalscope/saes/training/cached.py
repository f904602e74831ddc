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

import torch
from tqdm.auto import tqdm

from refusalscope.saes.training.activations import collect
from refusalscope.lm.loading import LoadedModel, cache_root
from refusalscope.saes.sae import Sae
from refusalscope.saes.saelens_io import load_sae_dir, save_sae
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
                  share_prefix: bool = True, device: str | None = None,
                  progress: bool = True) -> tuple[Path, dict[int, Sae], dict]:
    """Train the layers whose SAE is not cached yet; returns (set directory, {layer: Sae}, info)."""
    model_key = {"model": lm.name, "source": str(lm.source), "corpus": corpus_id, "n": len(corpus),
                 "replies": replies, "v": FORMAT_VERSION}
    cfg_key = {**model_key, "width": cfg.width, "k": cfg.k, "epochs": cfg.epochs, "batch": cfg.batch_size,
               "lr": cfg.lr, "aux_k": cfg.aux_k, "seed": cfg.seed, "norm_factor": norm_factor}
    set_dir = sae_cache_dir(lm.name, cfg_key)
    todo = [layer_id for layer_id in layers if not (set_dir / f"layer_{layer_id}" / "cfg.json").is_file()]
    info: dict = {"set_dir": str(set_dir), "trained": todo,
                  "reused": [layer_id for layer_id in layers if layer_id not in todo],
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
        # our choice: --share-prefix is not in the keys; it changes activations by float rounding only
        acts = collect(lm, texts, todo, acts_dir, batch_size=batch_size, share_prefix=share_prefix,
                       progress=progress)
        info["seconds"]["collect"] = time.perf_counter() - t0
        info["tokens"] = int(next(iter(acts.values())).shape[0])
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # one bar over the layers (ETA of the whole training), one per layer's optimiser steps below it
        layers_bar = tqdm(total=len(todo), desc="SAE training", unit="layer", disable=not progress,
                          dynamic_ncols=True)
        for layer in todo:
            t1 = time.perf_counter()
            x = acts.pop(layer)
            limit = max_norm_for(x, norm_factor)
            x = x[x.float().norm(dim=-1) <= limit]
            with tqdm(total=1, desc=f"SAE layer {layer}", disable=not progress, dynamic_ncols=True, leave=False,
                      position=1) as bar:
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
            layers_bar.update(1)
        layers_bar.close()
        info["seconds"]["total"] = time.perf_counter() - t0
    saes = {layer_id: load_sae_dir(set_dir / f"layer_{layer_id}") for layer_id in layers}
    return set_dir, saes, info
