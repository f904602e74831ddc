"""Stage 3 (paper, "Stage 3: Discovering feature interactions"): features that interact with the Stage-2 set.

1. ``fit_interaction_models``: the FM dataset (appendix "Dataset for training Factorization Machines": AdvBench
   label 1, as many Alpaca prompts label 0, 80/10/10; SAE activations at the last 4 prompt positions of layers
   2..l*), a second-order factorization machine (Eq. 2, ``stages.fm``) and a linear probe (``stages.probe``) on
   the same columns and split. Saved in the run store and reused.
2. ``rank_by_fm`` / ``rank_by_probe``: per prompt, the candidates are the features active on the prompt and not
   in its Stage-2 set; the FM scores each by cosine between its embedding and the embeddings of the prompt's
   active Stage-2 features (max or mean), the probe by |w|.
3. ``run_stage3``: ablate the active Stage-2 features plus the top-K candidates, K = 100, 200, …, judged by
   generation (the smallest jailbreaking K is kept); the probe ranking at the same K; "Stage-3 only" (the top-K
   new features alone at that K); and the causal link ("Stage 3 influence on Stage 2"): with the Stage-3
   features ablated, the share of active Stage-2 features that switch off and the mean relative drop of the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from refusalscope.config import Stage3Options
from refusalscope.data import load_prompts
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.loading import LoadedModel
from refusalscope.saes.features import Feature
from refusalscope.saes.sae import Sae
from refusalscope.stages import interaction_data as idata
from refusalscope.stages.context import Flow, StageContext
from refusalscope.stages.fm import FactorizationMachine, FmConfig, evaluate_fm, fm_embeddings, train_fm
from refusalscope.stages.probe import evaluate_probe, train_probe
from refusalscope.store import RunStore, digest

log = logging.getLogger("refusalscope")

MODELS_FILE = "stage3/models.json"
FM_FILE = "stage3/fm.safetensors"
PROBE_FILE = "stage3/probe.safetensors"


# ---- 1. the FM and the probe --------------------------------------------------------------------------------------

@dataclass
class InteractionModels:
    """What the rankings need: one FM embedding and one probe weight per feature, and the fit report."""

    # FM v_i per feature (positions mode: mean over its position columns); a FeatureTable from _models_from
    embeddings: Mapping[Feature, torch.Tensor]
    probe_weights: Mapping[Feature, float]  # |w| per feature (positions mode: max over its positions)
    report: dict  # accuracies, AUROC, column counts, dormant Stage-2 features, mode


def _columns_tensors(columns: Sequence) -> dict[str, torch.Tensor]:
    if isinstance(columns, idata.ColumnList):  # keep_columns' columns: their arrays, no objects
        zeros = np.zeros(len(columns), dtype=np.int64)
        return {"col_layer": torch.from_numpy(columns.layer.astype(np.int32)),
                "col_latent": torch.from_numpy(columns.latent.astype(np.int32)),
                "col_position": torch.from_numpy((zeros if columns.position is None else columns.position)
                                                 .astype(np.int32))}
    feats = idata.column_features(columns)
    pos = [getattr(c, "position", 0) for c in columns]
    return {"col_layer": torch.tensor([f.layer for f in feats], dtype=torch.int32),
            "col_latent": torch.tensor([f.latent for f in feats], dtype=torch.int32),
            "col_position": torch.tensor(pos, dtype=torch.int32)}


def _column_list(tensors: Mapping[str, torch.Tensor], mode: str) -> idata.ColumnList:
    return idata.ColumnList(tensors["col_layer"].numpy().astype(np.int64), tensors["col_latent"].numpy().astype(
        np.int64), None if mode == "max" else tensors["col_position"].numpy().astype(np.int64))


def _columns_from(tensors: Mapping[str, torch.Tensor], mode: str) -> list:
    layers, latents, pos = (tensors[k].tolist() for k in ("col_layer", "col_latent", "col_position"))
    if mode == "max":
        return [Feature(a, b) for a, b in zip(layers, latents)]
    return [idata.PositionedFeature(a, b, p) for a, b, p in zip(layers, latents, pos)]


def _models_from(fm_t: Mapping[str, torch.Tensor], probe_t: Mapping[str, torch.Tensor], report: dict,
                 ) -> InteractionModels:
    columns = _column_list(fm_t, report["mode"])  # arrays only: no object per column (the probe's are the same)
    groups = idata.FeatureGroups.of(columns)
    emb = idata.feature_embeddings(fm_t["V"], columns, groups)
    # our choice (positions mode): a feature's largest |w|
    weights = idata.feature_max(probe_t["w"].abs().double().numpy(), columns, groups)
    return InteractionModels(emb, weights, report)


def scale_columns(X, train_rows: np.ndarray, how: str = "column-max"):
    """Divide each column by its largest value over the training rows ("column-max"), or leave X as it is.

    Columns that never fire in training (kept Stage-2 features) keep scale 1.
    """
    if how == "none":
        return X
    import scipy.sparse as sp

    top = np.asarray(abs(X[train_rows]).max(axis=0).todense()).ravel()
    top[top <= 0] = 1.0
    return (X @ sp.diags(1.0 / top.astype(np.float32))).tocsr().astype(np.float32)


def fm_layers(saes: Mapping[int, Sae], first_layer: int, last_layer: int) -> list[int]:
    layers = [layer for layer in sorted(saes) if first_layer <= layer <= last_layer]
    if not layers:
        raise RefusalScopeError(f"the run has no SAE in layers {first_layer}..{last_layer} for Stage 3")
    return layers


def fit_interaction_models(lm: LoadedModel, saes: Mapping[int, Sae], store: RunStore, opts: Stage3Options, *,
                           stage2_features: Sequence[Feature], data_dir: str | None, batch_size: int = 16,
                           progress: bool = True, compute_chunks=None, sae_dtype: str = "float32"
                           ) -> InteractionModels:
    """Build (or reuse) the activation dataset, train (or reuse) the FM and the probe; see the module docstring.

    ``compute_chunks`` computes missing activation chunks elsewhere (``interaction_data.collect_activations``)."""
    harmful = load_prompts(opts.harmful, data_dir=data_dir).texts
    harmless = load_prompts(opts.harmless, data_dir=data_dir).texts
    layers = list(saes)
    always = sorted(set(stage2_features))
    inputs = {"harmful": digest(list(harmful)), "harmless": digest(list(harmless)),
              "layers": layers, "stage2": [str(f) for f in always],
              **opts.model_dump(mode="json", include={"first_layer", "n_positions", "positions", "scale", "fm_k",
                                                      "fm_lr", "fm_epochs", "fm_batch_size", "seed"})}
    if sae_dtype == "bfloat16":  # rounded SAE weights, other activations (float32 adds nothing: older FMs stay valid)
        inputs["sae_dtype"] = sae_dtype
    if store.exists(MODELS_FILE) and store.exists(FM_FILE) and store.exists(PROBE_FILE):
        report = store.read_json(MODELS_FILE)
        if report.get("inputs") == digest(inputs):
            fm_t, _ = store.read_tensors(FM_FILE)
            probe_t, _ = store.read_tensors(PROBE_FILE)
            return _models_from(fm_t, probe_t, report)
        log.warning("Stage 3's inputs changed since its FM was trained: building and training it again")

    # the dataset: 80/10/10 of harmful + as many harmless, activations at the last positions of every layer
    table = idata.build_prompt_table(harmful, harmless, seed=opts.seed)
    store.write_table("stage3/dataset.parquet", table)
    coo = idata.collect_activations(lm, saes, table, store, batch_size=batch_size, n_positions=opts.n_positions,
                                    progress=progress, compute=compute_chunks)
    y = table.label.to_numpy()
    rows = {name: (table.split == name).to_numpy() for name in ("train", "val", "test")}
    widths = {layer: saes[layer].width for layer in layers}
    device = opts.fm_device if opts.fm_device != "auto" else str(lm.device)
    cfg = FmConfig(k=opts.fm_k, lr=opts.fm_lr, epochs=opts.fm_epochs, batch_size=opts.fm_batch_size, seed=opts.seed,
                   device=device)
    # our choice: with positions "auto", train both layouts and keep the one with the better validation accuracy
    # (the paper does not say how the 4 positions are combined)
    modes = ["max", "positions"] if opts.positions == "auto" else [opts.positions]
    fits = {}
    for mode in modes:
        X, columns = idata.combine(coo, len(table), layers, widths, mode=mode, n_positions=opts.n_positions)
        X, columns, kept = idata.keep_columns(X, columns, rows["train"], always)
        X = scale_columns(X, rows["train"], opts.scale)
        fit = train_fm(X[rows["train"]], y[rows["train"]], X[rows["val"]], y[rows["val"]], cfg, progress=progress)
        fits[mode] = (fit, X, columns, kept)
        log.info("FM (%s): validation accuracy %.3f", mode, fit.val_accuracy)
    mode = max(modes, key=lambda m: (fits[m][0].val_accuracy, m == "max"))  # ties: the simpler max layout
    fit, X, columns, kept = fits[mode]
    fm_test = evaluate_fm(fit.model, X[rows["test"]], y[rows["test"]], device=device)
    probe = train_probe(X[rows["train"]], y[rows["train"]], X[rows["val"]], y[rows["val"]], seed=opts.seed)
    probe_test = evaluate_probe(probe, X[rows["test"]], y[rows["test"]])
    report = {
        "inputs": digest(inputs), "mode": mode, "layers": layers, "n_rows": len(table),
        "n_train": int(rows["train"].sum()), "n_val": int(rows["val"].sum()), "n_test": int(rows["test"].sum()),
        "fm_val_accuracy": fit.val_accuracy, "fm_best_epoch": fit.best_epoch,
        "fm_test_accuracy": fm_test["accuracy"], "fm_test_auroc": fm_test["auroc"],
        "fm_val_accuracy_by_mode": {m: fits[m][0].val_accuracy for m in modes},
        "probe_val_accuracy": probe.val_accuracy, "probe_C": probe.C,
        "probe_test_accuracy": probe_test["accuracy"], "probe_test_auroc": probe_test["auroc"],
        "columns": kept, "history": fit.history,
    }
    fm_t = {"V": fm_embeddings(fit.model), "w": fit.model.w.detach().cpu().flatten(),
            "bias": fit.model.bias.detach().cpu().reshape(1), **_columns_tensors(columns)}
    probe_t = {"w": torch.as_tensor(np.asarray(probe.weights), dtype=torch.float32),
               "bias": torch.tensor([float(probe.bias)]), **_columns_tensors(columns)}
    store.write_tensors(FM_FILE, fm_t, {"mode": mode, "k": opts.fm_k})
    store.write_tensors(PROBE_FILE, probe_t, {"mode": mode, "C": probe.C})
    store.write_json(MODELS_FILE, report)
    return _models_from(fm_t, probe_t, report)


def load_fm(store: RunStore) -> tuple[FactorizationMachine, list]:
    """The saved FM (Eq. 2) and its column keys, for analyses that reuse it without retraining."""
    tensors, meta = store.read_tensors(FM_FILE)
    model = FactorizationMachine(tensors["V"].shape[0], tensors["V"].shape[1])
    with torch.no_grad():  # through the V / w / bias views, whatever the module's parameter layout
        model.V.copy_(tensors["V"])
        model.w.copy_(tensors["w"].reshape(model.w.shape))
        model.bias.copy_(tensors["bias"].reshape(model.bias.shape))
    return model, _columns_from(tensors, meta["mode"])


# ---- 2. rankings (pure) -------------------------------------------------------------------------------------------

def _present(features: Sequence[Feature], table: Mapping) -> tuple[list[Feature], np.ndarray | None]:
    """The features ``table`` holds, in order, and (a ``FeatureTable``: one vectorized lookup) their rows of its
    ``data``; None for any other mapping."""
    if isinstance(table, idata.FeatureTable):
        rows = table.rows(features)
        have = np.flatnonzero(rows >= 0)
        return [features[i] for i in have.tolist()], rows[have]
    return [f for f in features if f in table], None


def _embedded(features: Sequence[Feature], embeddings: Mapping[Feature, torch.Tensor]
              ) -> tuple[list[Feature], torch.Tensor]:
    """The features that have an embedding, in order, and their embeddings stacked (one gather from a
    ``FeatureTable``)."""
    have, rows = _present(features, embeddings)
    if rows is not None:
        return have, embeddings.data[torch.from_numpy(rows)]
    return have, torch.stack([embeddings[f] for f in have]) if have else torch.zeros(0)


def rank_by_fm(candidates: Sequence[Feature], anchors: Sequence[Feature], embeddings: Mapping[Feature, torch.Tensor],
               score: str = "max") -> list[tuple[Feature, float]]:
    """Candidates by cosine of their FM embedding to the anchors' (the prompt's active Stage-2 features), best
    first; features without an embedding are left out. Ties keep (layer, latent) order."""
    cands, C = _embedded(candidates, embeddings)
    _, A = _embedded(anchors, embeddings)
    if not cands or not len(A):
        return []
    A = torch.nn.functional.normalize(A.double(), dim=1)
    C = torch.nn.functional.normalize(C.double(), dim=1)
    cos = C @ A.T  # (candidates, anchors)
    scores = cos.max(dim=1).values if score == "max" else cos.mean(dim=1)
    values = scores.tolist()  # Python floats once, not a tensor read per comparison
    order = sorted(range(len(cands)), key=lambda i: (-values[i], cands[i]))
    return [(cands[i], values[i]) for i in order]


def rank_by_probe(candidates: Sequence[Feature], weights: Mapping[Feature, float]) -> list[tuple[Feature, float]]:
    """Candidates by the probe's |w|, best first (the paper's linear baseline)."""
    have, rows = _present(candidates, weights)
    values = weights.data[rows].tolist() if rows is not None else [weights[f] for f in have]
    return sorted(zip(have, values), key=lambda p: (-p[1], p[0]))


# ---- 3. one prompt ------------------------------------------------------------------------------------------------

class KResult(BaseModel):
    method: str  # fm | probe | stage3_only
    k: int
    size: int  # features ablated
    completion: str
    jailbroken: bool
    refused: bool
    degenerate: bool


class CausalLink(BaseModel):
    """Stage-2 features active on the prompt, measured with the Stage-3 set ablated (paper, "Stage 3 influence on
    Stage 2")."""

    k: int
    n_stage2_active: int
    n_switched_off: int
    switched_off_frac: float | None
    mean_relative_drop: float | None  # over those still on: (a_clean − a_ablated) / a_clean


class Stage3Result(BaseModel):
    id: int
    prompt: str
    settings: dict
    tau: float  # the τ of the Stage-2 set used
    stage2: list[Feature]
    stage2_active: list[Feature]
    n_candidates: int
    fm_ranking: list[Feature]  # top max(K) new features by FM cosine: the set at K is stage2_active + fm_ranking[:K]
    probe_ranking: list[Feature]
    sweep: list[KResult] = Field(default_factory=list)
    best_k: int | None = None
    stage3_only: KResult | None = None
    causal: CausalLink | None = None
    seconds: float = 0.0

    @staticmethod
    def file_name(prompt_id: int) -> str:
        return f"stage3/prompts/{int(prompt_id):05d}.json"


def _judge_rows(prompt: str, rows: list[tuple[str, int, list[Feature]]]) -> Flow:
    results = yield [(prompt, feats) for _, _, feats in rows]
    return [KResult(method=m, k=k, size=len(set(feats)), completion=r.completion, **r.verdict.as_dict())
            for (m, k, feats), r in zip(rows, results)]


def causal_link(ctx: StageContext, prompt: str, stage2_active: Sequence[Feature], stage3_set: Sequence[Feature],
                clean: Mapping[Feature, float], k: int) -> CausalLink:
    after = ctx.activations(prompt, stage2_active, ablate=stage3_set)
    off = [f for f in stage2_active if after[f] <= 0]
    still = [f for f in stage2_active if after[f] > 0]
    drops = [(clean[f] - after[f]) / clean[f] for f in still]
    n = len(stage2_active)
    return CausalLink(k=k, n_stage2_active=n, n_switched_off=len(off), switched_off_frac=len(off) / n if n else None,
                      mean_relative_drop=float(np.mean(drops)) if drops else None)


def stage3_flow(ctx: StageContext, prompt_id: int, prompt: str, stage2_set: Sequence[Feature], tau: float,
                models: InteractionModels, opts: Stage3Options, settings: dict) -> Flow:
    """Stage 3 for one prompt (see the module docstring) as a flow (``StageContext.lockstep``)."""
    t0 = time.perf_counter()
    clean = ctx.activations(prompt)  # every feature that fires on the prompt, with its max activation
    stage2 = sorted(set(stage2_set))
    anchors = [f for f in stage2 if clean.get(f, 0.0) > 0]
    in_stage2 = set(stage2)
    candidates = sorted(f for f in clean if f not in in_stage2)
    # our choice: a prompt whose Stage-2 features are all inactive has no active anchor; rank by all of them
    fm_rank = rank_by_fm(candidates, anchors or stage2, models.embeddings, opts.score)
    probe_rank = rank_by_probe(candidates, models.probe_weights)
    k_max = max([*opts.k_values, *opts.probe_k])
    res = Stage3Result(id=prompt_id, prompt=prompt, settings=settings, tau=tau, stage2=stage2, stage2_active=anchors,
                       n_candidates=len(candidates), fm_ranking=[f for f, _ in fm_rank[:k_max]],
                       probe_ranking=[f for f, _ in probe_rank[:k_max]])

    def fm_set(k):
        return anchors + res.fm_ranking[:k]

    # the equal-K comparison (FM and probe at probe_k) and the first chunk of the sweep share one batch
    ks = sorted(opts.k_values)
    rows = [("fm", k, fm_set(k)) for k in ks[:opts.k_chunk]]
    rows += [("fm", k, fm_set(k)) for k in opts.probe_k if k not in ks[:opts.k_chunk]]
    rows += [("probe", k, anchors + res.probe_ranking[:k]) for k in opts.probe_k]
    judged = yield from _judge_rows(prompt, rows)
    done = {(r.method, r.k): r for r in judged}
    for start in range(opts.k_chunk, len(ks), opts.k_chunk):
        if any(done.get(("fm", k)) and done[("fm", k)].jailbroken for k in ks[:start]):
            break
        todo = [("fm", k, fm_set(k)) for k in ks[start:start + opts.k_chunk] if ("fm", k) not in done]
        done.update({(r.method, r.k): r for r in (yield from _judge_rows(prompt, todo))})
    res.sweep = sorted(done.values(), key=lambda r: (r.method, r.k))
    res.best_k = next((k for k in ks if done.get(("fm", k)) and done[("fm", k)].jailbroken), None)
    k_used = res.best_k if res.best_k is not None else ks[-1]
    new = res.fm_ranking[:k_used]
    if new:
        res.stage3_only = (yield from _judge_rows(prompt, [("stage3_only", k_used, new)]))[0]
        if anchors:
            res.causal = causal_link(ctx, prompt, anchors, new, clean, k_used)
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def run_stage3_many(ctx: StageContext, items: Sequence[tuple[int, str, Sequence[Feature], float]],
                    models: InteractionModels, opts: Stage3Options, settings: dict) -> list[Stage3Result]:
    """``run_stage3`` on several (prompt id, prompt, Stage-2 set, τ) items, their completions generated in shared
    batches; each result is the one ``run_stage3`` gives alone (its ``seconds`` include time shared with the
    others)."""
    return ctx.lockstep([stage3_flow(ctx, pid, prompt, feats, tau, models, opts, settings)
                         for pid, prompt, feats, tau in items])


def run_stage3(ctx: StageContext, prompt_id: int, prompt: str, stage2_set: Sequence[Feature], tau: float,
               models: InteractionModels, opts: Stage3Options, settings: dict) -> Stage3Result:
    """Stage 3 for one prompt (see the module docstring)."""
    return run_stage3_many(ctx, [(prompt_id, prompt, stage2_set, tau)], models, opts, settings)[0]
