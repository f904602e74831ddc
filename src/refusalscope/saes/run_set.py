"""The run's SAE set: train or choose it, record it in the run store (``saes.json``), load it, report quality."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from refusalscope.config import SaeEvalSettings, SaeTrainSettings, parse_layers
from refusalscope.data import load_prompts
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.loading import LoadedModel
from refusalscope.saes.sae import Sae, check_against_model
from refusalscope.saes.registry import load_sae_set
from refusalscope.saes.training.topk import TrainConfig
from refusalscope.saes.evals import evaluate_sae_set
from refusalscope.saes.training.cached import train_sae_set
from refusalscope.store import RunStore


def default_layers(store: RunStore, n_layers: int, spec: str | None, stride: int = 1) -> list[int]:
    """``spec`` if given, else 2..l* of the run's direction (all layers when the run has none); l* always kept."""
    if spec is not None:
        layers = parse_layers(spec, n_layers)
    elif store.exists("direction.json"):
        top = int(store.read_json("direction.json")["layer"])
        layers = list(range(min(2, top), top + 1))
    else:
        layers = list(range(n_layers))
    picked = layers[::stride]
    if layers[-1] not in picked:
        picked.append(layers[-1])
    return picked


def _prompts(names: Sequence[str], data_dir: str | None) -> list[str]:
    out: list[str] = []
    for name in names:
        out.extend(load_prompts(name, data_dir=data_dir).texts)
    return list(dict.fromkeys(out))


def record_sae_set(store: RunStore, spec: str, layers: Sequence[int], info: dict | None = None) -> None:
    store.write_json("saes.json", {"spec": spec, "layers": sorted(layers), **(info or {})})


def load_run_saes(
    store: RunStore, lm: LoadedModel | None = None, layers: Sequence[int] | None = None
) -> dict[int, Sae]:
    """The SAE set recorded in the run, checked against the model."""
    rec = store.read_json("saes.json")
    wanted = rec["layers"] if layers is None else list(layers)
    missing = sorted(set(wanted) - set(rec["layers"]))
    if missing:
        raise RefusalScopeError(f"the run has no SAE for layer(s) {missing}; it has {rec['layers']}")
    saes = load_sae_set(rec["spec"], wanted)
    if lm is not None:
        check_against_model(saes, lm.n_layers, lm.d_model)
    return saes


def eval_prompts(names: Sequence[str], n: int, data_dir: str | None, exclude: Sequence[str] = ()) -> list[str]:
    texts = [t for t in _prompts(names, data_dir) if t not in set(exclude)]
    # interleave the sets so a small n still covers each of them
    per = [[t for t in load_prompts(nm, data_dir=data_dir).texts if t in set(texts)] for nm in names]
    mixed = [t for group in zip(*per) for t in group] + [t for g in per for t in g]
    return list(dict.fromkeys(mixed))[:n]


def run_sae_train(lm: LoadedModel, settings: SaeTrainSettings, store: RunStore, data_dir: str | None) -> pd.DataFrame:
    layers = default_layers(store, lm.n_layers, settings.layers, settings.stride)
    held_out = set(_prompts(settings.eval_sets, data_dir))
    corpus = [t for t in _prompts(settings.corpus, data_dir) if t not in held_out]
    if settings.max_prompts:
        corpus = corpus[: settings.max_prompts]
    if not corpus:
        raise RefusalScopeError("the SAE training corpus is empty")
    cfg = TrainConfig(
        width=settings.width,
        k=settings.k,
        epochs=settings.epochs,
        batch_size=settings.train_batch_size,
        lr=settings.lr,
        seed=settings.seed,
    )
    set_dir, saes, info = train_sae_set(
        lm,
        layers,
        corpus,
        cfg,
        corpus_id=",".join(settings.corpus),
        replies=settings.replies,
        norm_factor=settings.norm_factor,
        batch_size=settings.batch_size,
    )
    check_against_model(saes, lm.n_layers, lm.d_model)
    record_sae_set(
        store, str(set_dir), layers, {"kind": "trained", "train": info, "config": settings.model_dump(mode="json")}
    )
    table = evaluate_sae_set(
        lm, saes, eval_prompts(settings.eval_sets, settings.n_eval, data_dir), batch_size=settings.batch_size
    )
    store.write_table("sae_eval.parquet", table)
    return table


def run_sae_eval(lm: LoadedModel, settings: SaeEvalSettings, store: RunStore, data_dir: str | None) -> pd.DataFrame:
    saes = load_run_saes(store, lm)
    table = evaluate_sae_set(
        lm, saes, eval_prompts(settings.eval_sets, settings.n_eval, data_dir), batch_size=settings.batch_size
    )
    store.write_table("sae_eval.parquet", table)
    return table
