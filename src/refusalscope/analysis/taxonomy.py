"""Taxonomy mapping (paper, Fig. 3 and "Mapping causal features to unsafe taxonomy"): each feature the run found is
mapped to the CoCoNot unsafe categories on whose prompts it has non-zero activation, and the number of features
that fire on no, one or several categories is compared with equal-size random features of the same layers.

``refusalscope analyze taxonomy --run RUN``. One batched pass over the CoCoNot prompts records each needed latent's
maximum activation per prompt (``activations.safetensors``, reused on a rerun with the same prompts and features).
No completions are generated, so no judge is involved.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentRecorder
from refusalscope.lm.hooks import Hook, StopForward, batch_context, hooked
from refusalscope.lm.inference import length_sorted_batches
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.segments import prompt_tokens, template_spans
from refusalscope.saes.features import Feature, as_latent_set
from refusalscope.saes.sae import Sae
from refusalscope.store import digest

NEEDS = ("stage2",)
OUT = "analyses/taxonomy"
SAFETY = "Requests with safety concerns"
BUCKETS = ("0", "1", "2+")


# ---- the prompts --------------------------------------------------------------------------------------------------

def load_categories(path: str | Path, *, level: str = "subcategory", max_per_category: int | None = 60,
                    min_category_prompts: int = 1, seed: int = 0) -> dict[str, list[str]]:
    """Unsafe category -> CoCoNot prompts (the "original" subset, which a model should not comply with).

    Our choice: ``level="subcategory"`` takes the subcategories of "Requests with safety concerns" (the unsafe
    taxonomy of the paper's Fig. 3); ``level="category"`` the five top categories of the original subset.
    Categories with fewer than ``min_category_prompts`` prompts are dropped (CoCoNot has a one-prompt
    "incomprehensible" subcategory under safety concerns); larger ones keep a seeded sample of ``max_per_category``.
    """
    path = Path(path)
    if not path.is_file():
        raise RefusalScopeError(f"the taxonomy needs CoCoNot at {path}; pass the data directory with --data-dir")
    try:
        frame = pd.read_json(path, lines=True)
    except ValueError as e:
        raise RefusalScopeError(f"{path} is not JSON lines ({e})") from None
    missing = {"subset", "category", "subcategory", "prompt"} - set(frame.columns)
    if missing:
        raise RefusalScopeError(f"{path} lacks the field(s) {sorted(missing)} of CoCoNot")
    frame = frame[frame.subset == "original"]
    if level == "subcategory":
        frame, label = frame[frame.category == SAFETY], "subcategory"
    elif level == "category":
        label = "category"
    else:
        raise RefusalScopeError(f"unknown taxonomy level {level!r}; use subcategory or category")
    out: dict[str, list[str]] = {}
    for name, group in frame.groupby(label, sort=True):
        texts = list(dict.fromkeys(str(t).strip() for t in group.prompt if str(t).strip()))
        if len(texts) < min_category_prompts:
            continue
        if max_per_category is not None and len(texts) > max_per_category:
            keep = set(random.Random(f"{seed}/{name}").sample(range(len(texts)), max_per_category))
            texts = [t for i, t in enumerate(texts) if i in keep]  # file order kept
        out[str(name)] = texts
    if not out:
        raise RefusalScopeError(f"{path} holds no {level} of the original subset with ≥ {min_category_prompts} "
                                "prompts")
    return out


# ---- activations --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def user_positions(lm: LoadedModel, prompts: Sequence[str], width: int, rows: Sequence[int]) -> torch.Tensor:
    """(len(rows), width) mask of the user-text tokens of each left-padded chat-formatted prompt."""
    spans = template_spans(lm.tokenizer)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, i in enumerate(rows):
        _, _, segments = prompt_tokens(lm.tokenizer, prompts[i], spans)
        pad = width - len(segments)
        for t, seg in enumerate(segments):
            if seg == "user":
                mask[r, pad + t] = True
    return mask


def max_activations(lm: LoadedModel, saes: Mapping[int, Sae], prompts: Sequence[str], features: Sequence[Feature], *,
                    batch_size: int = 16, progress: bool = False, positions: str = "user") -> torch.Tensor:
    """(prompts, features) maximum activation over the user-text tokens (``positions="user"``) or every real
    (unpadded) position (``"all"``) of each chat-formatted prompt.

    Batched, left-padded forwards that stop after the deepest layer needed; the plain form (``"all"``) is
    ``saes.features.active_features`` one prompt at a time.
    """
    latent_sets = as_latent_set(features)
    col = {f: j for j, f in enumerate(features)}
    out = torch.zeros(len(prompts), len(features))
    if not features or not prompts:
        return out
    top = max(latent_sets)

    def stop(h):
        raise StopForward

    texts = format_chat(lm.tokenizer, prompts)
    with tqdm(total=len(texts), desc="taxonomy activations", unit="prompt", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for rows in length_sorted_batches(texts, lm.tokenizer, batch_size):
            batch = tokenize(lm.tokenizer, [texts[i] for i in rows], lm.device)
            rec = LatentRecorder(saes, latent_sets)
            hooks = [*hooks_for([rec], lm.n_layers), Hook("resid_post", top, stop)]
            try:
                with hooked(lm.model, hooks), batch_context(batch["attention_mask"]):
                    lm.model(**batch, logits_to_keep=1, use_cache=False)
            except StopForward:
                pass
            real = batch["attention_mask"].bool().cpu()  # padding positions never count
            if positions == "user":
                real &= user_positions(lm, prompts, real.shape[1], rows)
            real = real[..., None]
            idx = torch.tensor(rows)
            for layer, ids in latent_sets.items():
                z = rec.records[layer][0].masked_fill(~real, 0.0).amax(dim=1)  # (B, n)
                out[idx[:, None], torch.tensor([col[Feature(layer, i)] for i in ids])[None, :]] = z
            bar.update(len(rows))
    return out


def prompt_counts(acts: torch.Tensor, prompt_category: Sequence[str], categories: Sequence[str]) -> torch.Tensor:
    """(features, categories): on how many prompts of each category each feature has non-zero activation."""
    member = torch.tensor([[c == name for name in categories] for c in prompt_category], dtype=torch.float32)
    return ((acts > 0).float().T @ member).round().long()


def mapped_categories(counts: torch.Tensor, categories: Sequence[str], min_prompts: int = 1,
                      min_share: float = 0.0, sizes: Sequence[int] | None = None) -> list[list[str]]:
    """Per feature, the categories it maps to: non-zero activation on at least ``min_prompts`` of their prompts and
    on at least ``min_share`` of them (``sizes``: prompts per category)."""
    need = torch.full((len(categories),), float(min_prompts))
    if min_share > 0:
        need = torch.maximum(need, min_share * torch.tensor([float(n) for n in sizes]))
    return [[categories[j] for j in torch.nonzero(row >= need - 1e-9).flatten().tolist()] for row in counts]


def share_sweep(counts: torch.Tensor, sizes: Sequence[int], pipeline: torch.Tensor,
                shares: Sequence[float] = (0.0, 0.1, 0.25, 0.5)) -> pd.DataFrame:
    """Single/multi/none counts of pipeline and random features at several ``min_share`` thresholds (0: the paper's
    rule, non-zero on one prompt), so the comparison does not hang on one threshold."""
    rows = []
    for share in shares:
        need = torch.clamp(share * torch.tensor([float(n) for n in sizes]), min=1.0)
        k = (counts >= need - 1e-9).sum(dim=1)
        for source, keep in (("pipeline", pipeline), ("random", ~pipeline)):
            part = k[keep]
            rows.append({"min_share": share, "source": source, "n": int(keep.sum()), "none": int((part == 0).sum()),
                         "single": int((part == 1).sum()), "multi": int((part >= 2).sum())})
    return pd.DataFrame(rows)


def random_features(pipeline: Sequence[Feature], widths: Mapping[int, int], seed: int = 0) -> list[Feature]:
    """As many random features per layer as the pipeline has there, drawn from that layer's other latents.

    Our choice: matched per-layer counts, so depth (which changes how broadly latents fire) is the same in both.
    """
    rng = random.Random(seed)
    out: list[Feature] = []
    by_layer = as_latent_set(sorted(set(pipeline)))
    for layer, taken in sorted(by_layer.items()):
        pool = sorted(set(range(widths[layer])) - set(taken))
        out += [Feature(layer, i) for i in rng.sample(pool, min(len(taken), len(pool)))]
    return sorted(out)


def bucket(n: int) -> str:
    return BUCKETS[min(n, 2)]


# ---- the analysis -----------------------------------------------------------------------------------------------

def plot_taxonomy(counts: pd.DataFrame, per_category: pd.DataFrame):
    """Left: share of features firing on 0, 1 and ≥ 2 categories, pipeline vs random (paper, Fig. 3).
    Right: features mapped to each category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    colors = {"pipeline": "tab:red", "random": "grey"}
    x = range(len(BUCKETS))
    for j, source in enumerate(("pipeline", "random")):
        part = counts[counts.source == source].set_index("bucket").reindex(BUCKETS)
        ax.bar([i + (j - 0.5) * 0.38 for i in x], part.fraction.fillna(0), width=0.38, color=colors[source],
               label=f"{source} ({int(part.n_features.sum())})")
    ax.set_xticks(list(x), ["no category", "one", "two or more"])
    ax.set_ylabel("share of features")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Categories each feature fires on")
    cats = sorted(per_category.category.unique())
    y = range(len(cats))
    for j, source in enumerate(("pipeline", "random")):
        part = per_category[per_category.source == source].set_index("category").reindex(cats)
        bx.bar([i + (j - 0.5) * 0.38 for i in y], part.n_features.fillna(0), width=0.38, color=colors[source],
               label=source)
    bx.set_xticks(list(y), cats, rotation=30, ha="right", fontsize=8)
    bx.set_ylabel("features mapped")
    bx.legend(frameon=False, fontsize=8)
    bx.set_title("Features per CoCoNot category")
    fig.tight_layout()
    return fig


def _activations(finished: FinishedRun, ctx, prompts: list[str], features: list[Feature],
                 progress: bool, positions: str = "user") -> torch.Tensor:
    """The (prompts, features) activations, reused from the store when prompts, features and model dtype match."""
    name = f"{OUT}/activations.safetensors"
    key = digest({"prompts": prompts, "features": [str(f) for f in features], "dtype": str(ctx.lm.dtype),
                  "positions": positions})
    if finished.store.exists(name):
        tensors, meta = finished.store.read_tensors(name)
        if meta.get("key") == key:
            return tensors["max_activation"]
    acts = max_activations(ctx.lm, ctx.saes, prompts, features, batch_size=ctx.batch_size, progress=progress,
                           positions=positions)
    finished.store.write_tensors(name, {"max_activation": acts},
                                 {"key": key, "features": [str(f) for f in features], "n_prompts": len(prompts)})
    return acts


def run(finished: FinishedRun, settings, progress: bool = True) -> dict:
    data_dir = settings.data_dir or finished.data_dir
    if not data_dir:
        raise RefusalScopeError("the taxonomy needs the data directory holding coconot.jsonl; pass --data-dir")
    cats = load_categories(Path(data_dir) / "coconot.jsonl", level=settings.level,
                           max_per_category=settings.max_per_category,
                           min_category_prompts=settings.min_category_prompts, seed=settings.seed)
    groups = finished.pipeline_features()
    if not groups:
        raise RefusalScopeError(f"{finished.store.root} found no features to map")
    pipeline = sorted(groups)
    ctx = finished.context(device=settings.device, dtype=settings.dtype, judge="substring",  # nothing is judged
                           batch_size=settings.batch_size, layers=sorted({f.layer for f in pipeline}))
    rand = random_features(pipeline, {layer: sae.width for layer, sae in ctx.saes.items()}, seed=settings.seed)
    features = sorted(set(pipeline) | set(rand))
    categories = sorted(cats)
    prompts = [p for c in categories for p in cats[c]]
    prompt_category = [c for c in categories for _ in cats[c]]
    acts = _activations(finished, ctx, prompts, features, progress, settings.positions)
    counts = prompt_counts(acts, prompt_category, categories)
    sizes = [len(cats[c]) for c in categories]
    mapped = mapped_categories(counts, categories, settings.min_prompts, settings.min_share, sizes)
    rows = []
    pipe_set = set(pipeline)
    for j, f in enumerate(features):
        source = "pipeline" if f in pipe_set else "random"
        group = ",".join(groups[f]) if source == "pipeline" else ("random_active" if mapped[j] else "random_inactive")
        rows.append({"feature": str(f), "layer": f.layer, "latent": f.latent, "source": source, "group": group,
                     "categories": mapped[j], "n_categories": len(mapped[j]),
                     "prompt_counts": {c: int(counts[j, i]) for i, c in enumerate(categories)},
                     "max_activation": float(acts[:, j].max())})
    table = pd.DataFrame(rows)
    finished.store.write_table(f"{OUT}/features.parquet", table)

    table["bucket"] = table.n_categories.map(bucket)
    count_rows, cat_rows, headline = [], [], {}
    for source in ("pipeline", "random"):
        part = table[table.source == source]
        n = len(part)
        per = {b: int((part.bucket == b).sum()) for b in BUCKETS}
        headline[source] = {"n": n, "none": per["0"], "single": per["1"], "multi": per["2+"]}
        count_rows += [{"source": source, "bucket": b, "n_features": per[b], "fraction": per[b] / n if n else 0.0}
                       for b in BUCKETS]
        cat_rows += [{"source": source, "category": c, "n_prompts": len(cats[c]),
                      "n_features": int(part.categories.map(lambda cs, c=c: c in cs).sum())} for c in categories]
    count_t, cat_t = pd.DataFrame(count_rows), pd.DataFrame(cat_rows)
    sweep = share_sweep(counts, sizes, torch.tensor([f in pipe_set for f in features]))
    finished.store.write_table(f"{OUT}/share_sweep.parquet", sweep)
    finished.store.write_table(f"{OUT}/counts.parquet", count_t)
    finished.store.write_table(f"{OUT}/category_counts.parquet", cat_t)
    finished.store.save_figure(f"{OUT}/taxonomy.png", plot_taxonomy(count_t, cat_t))
    return {"judge": None, "level": settings.level, "min_prompts": settings.min_prompts,
            "min_share": settings.min_share, "positions": settings.positions,
            "share_sweep": sweep.to_dict(orient="records"),
            "categories": {c: len(cats[c]) for c in categories}, "n_prompts": len(prompts), **headline,
            "per_category": {s: {r.category: int(r.n_features) for r in cat_t[cat_t.source == s].itertuples()}
                             for s in ("pipeline", "random")}}


def summary_lines(summary: dict) -> list[str]:
    def part(s):
        return (f"{s['n']} features: {s['single']} single-category, {s['multi']} multi-category, "
                f"{s['none']} on none")

    cats = ", ".join(f"{c} ({n})" for c, n in summary["categories"].items())
    share = summary.get("min_share", 0.0)
    rule = f"≥ {summary['min_prompts']}" + (f" and ≥ {share:.0%}" if share else "")
    sweep = [f"  min share {r['min_share']:g}: {r['source']} {r['single']} single / {r['multi']} multi / "
             f"{r['none']} none" for r in summary.get("share_sweep", [])]
    return [f"taxonomy (activation-based, no judge) over {summary['n_prompts']} CoCoNot prompts by {summary['level']}"
            f", {summary.get('positions', 'all')} tokens (a feature maps to a category when active on {rule} of its "
            "prompts):",
            f"  categories: {cats}",
            f"  pipeline: {part(summary['pipeline'])}",
            f"  random (same layers, same counts): {part(summary['random'])}",
            *sweep,
            f"  → {OUT}/ (features.parquet, counts.parquet, category_counts.parquet, share_sweep.parquet, "
            "taxonomy.png)"]
