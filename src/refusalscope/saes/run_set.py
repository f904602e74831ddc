"""The run's SAE set: train or choose it, record it in the run store (``saes.json``), load it, report quality.

``saes.json`` holds no machine-specific path, so a run directory can move between machines: a set under the SAE
cache (the ones we train) is recorded as ``cache:REL`` and found again under this machine's cache
(``REFUSALSCOPE_CACHE``), a directory inside the run as ``run:REL``; registry names, ``saelens:`` ids and the
user's own directories as given. Runs that recorded an absolute cache path still load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from refusalscope.config import SaeEvalSettings, SaeTrainSettings, parse_layers
from refusalscope.data import load_prompts
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.loading import LoadedModel, cache_root
from refusalscope.saes.sae import Sae, check_against_model
from refusalscope.saes.registry import SAE_SETS, load_sae_set
from refusalscope.saes.training.topk import TrainConfig
from refusalscope.saes.evals import evaluate_sae_set
from refusalscope.saes.training.cached import train_sae_set
from refusalscope.store import RUN_PREFIX, RunStore

CACHE_PREFIX = "cache:"  # a path under the refusalscope cache (``lm.loading.cache_root``), relative to it


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


def portable_spec(store: RunStore, spec: str) -> str:
    """How ``saes.json`` records the SAE set ``spec`` (see the module docstring)."""
    if spec in SAE_SETS or spec.startswith(("saelens:", CACHE_PREFIX, RUN_PREFIX)):
        return spec
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    inside = store.portable(str(path.absolute()))
    if inside.startswith(RUN_PREFIX):
        return inside
    path, cache = path.resolve(), cache_root().resolve()
    if cache in path.parents:
        return CACHE_PREFIX + path.relative_to(cache).as_posix()
    return spec


def resolve_spec(store: RunStore, spec: str) -> str:
    """The spec ``load_sae_set`` loads on this machine for a recorded one: ``cache:REL`` under this machine's
    cache, ``run:REL`` under the run directory; an absolute cache path recorded by an older run that no longer
    exists is looked up under this machine's cache (``.../saes/MODEL/KEY``)."""
    if spec.startswith(CACHE_PREFIX):
        path = cache_root() / spec[len(CACHE_PREFIX):]
        if not path.is_dir():
            raise RefusalScopeError(
                f"the run's SAE set {spec} is not in this machine's cache ({cache_root()}): copy "
                f"{spec[len(CACHE_PREFIX):]} there from the machine that trained it, or point REFUSALSCOPE_CACHE "
                "at a cache that has it"
            )
        return str(path)
    if spec.startswith(RUN_PREFIX):
        return store.resolve(spec)
    path = Path(spec).expanduser()
    if path.is_absolute() and not path.exists() and len(path.parts) > 3 and path.parts[-3] == "saes":
        local = cache_root().joinpath(*path.parts[-3:])
        if local.is_dir():
            return str(local)
    return spec


def same_sae_set(store: RunStore, given: str, recorded: str) -> bool:
    """Whether ``--saes given`` names the set a run recorded (in either form)."""
    return given == recorded or portable_spec(store, given) == portable_spec(store, resolve_spec(store, recorded))


def record_sae_set(store: RunStore, spec: str, layers: Sequence[int], info: dict | None = None) -> None:
    store.write_json(
        "saes.json", store.portable({"spec": portable_spec(store, spec), "layers": sorted(layers), **(info or {})})
    )


def neuronpedia_record(saes: dict[int, Sae]) -> dict:
    """``{"neuronpedia": {layer: MODEL/SOURCE}}`` for saes.json when every SAE names its Neuronpedia source (SAELens
    releases carry it), so `analyze explain` finds their explanations without --neuronpedia-source; else {}."""
    ids = {str(layer): sae.neuronpedia_id for layer, sae in sorted(saes.items())}
    return {"neuronpedia": ids} if ids and all(ids.values()) else {}


def recorded_sae_dtype(store: RunStore) -> str:
    """How the run's stages held its SAE set (config.run.json's ``sae_dtype``: float32 or bfloat16), "auto"
    before they ran (or for a run older than the setting)."""
    cfg = store.read_json("config.run.json") if store.exists("config.run.json") else {}
    return cfg.get("sae_dtype") or "auto"


def load_run_saes(
    store: RunStore, lm: LoadedModel | None = None, layers: Sequence[int] | None = None, dtype: str | None = None
) -> dict[int, Sae]:
    """The SAE set recorded in the run, checked against the model, held in host memory in ``dtype``
    (``saes.placement.choose_host_dtype``; default: as the run's stages held it, ``recorded_sae_dtype``)."""
    rec = store.read_json("saes.json")
    wanted = rec["layers"] if layers is None else list(layers)
    missing = sorted(set(wanted) - set(rec["layers"]))
    if missing:
        raise RefusalScopeError(f"the run has no SAE for layer(s) {missing}; it has {rec['layers']}")
    saes = load_sae_set(resolve_spec(store, rec["spec"]), wanted, dtype or recorded_sae_dtype(store))
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
        share_prefix=settings.share_prefix,
    )
    check_against_model(saes, lm.n_layers, lm.d_model)
    spec = portable_spec(store, str(set_dir))
    record_sae_set(
        store,
        spec,
        layers,
        {"kind": "trained", "train": {**info, "set_dir": spec}, "config": settings.model_dump(mode="json")},
    )
    table = evaluate_sae_set(
        lm, saes, eval_prompts(settings.eval_sets, settings.n_eval, data_dir), batch_size=settings.batch_size,
        share_prefix=settings.share_prefix,
    )
    store.write_table("sae_eval.parquet", table)
    return table


def run_sae_eval(lm: LoadedModel, settings: SaeEvalSettings, store: RunStore, data_dir: str | None) -> pd.DataFrame:
    saes = load_run_saes(store, lm)  # held as the run's stages held them, if it has run them
    table = evaluate_sae_set(
        lm, saes, eval_prompts(settings.eval_sets, settings.n_eval, data_dir), batch_size=settings.batch_size,
        share_prefix=settings.share_prefix,
    )
    store.write_table("sae_eval.parquet", table)
    return table
