"""What the annotation reads from a run: the taxonomy's features and activation-based labels, the CoCoNot categories,
and the explanations with their top-activating contexts. Read defensively (these files come from other analyses),
without loading the model or torch, so the app starts fast."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from refusalscope.errors import RefusalScopeError

FEATURES = "analyses/taxonomy/features.parquet"
TAXONOMY_SUMMARY = "analyses/taxonomy/summary.json"
EXPLANATIONS = "analyses/explain/explanations.json"
SAFETY = "Requests with safety concerns"  # the CoCoNot category the taxonomy maps onto (paper, Fig. 3)


def read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_features(run: Path) -> pd.DataFrame:
    p = Path(run) / FEATURES
    if not p.is_file():
        raise RefusalScopeError(f"{run} has no taxonomy ({FEATURES}); run 'refusalscope analyze taxonomy --run {run}' "
                                "first: the annotation compares with its activation-based labels")
    try:
        frame = pd.read_parquet(p)
    except Exception as e:
        raise RefusalScopeError(f"{p} could not be read ({type(e).__name__}: {e}); the run may be corrupt") from None
    missing = {"feature", "group", "categories"} - set(frame.columns)
    if missing:
        raise RefusalScopeError(f"{p} lacks the column(s) {', '.join(sorted(missing))}")
    return frame


def label_list(value) -> list[str]:
    """A categories cell (list, array, JSON text, None) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value] if value else []
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    try:
        return [str(v) for v in value]
    except TypeError:
        return []


def activation_labels(features: pd.DataFrame) -> dict[str, frozenset[str]]:
    """feature → the categories it fires on (the taxonomy's activation-based label)."""
    out: dict[str, set[str]] = {}
    for feature, cats in zip(features["feature"].astype(str), features["categories"]):
        out.setdefault(feature, set()).update(label_list(cats))
    return {f: frozenset(c) for f, c in out.items()}


def _data_dir(run: Path, data_dir: str | None) -> Path | None:
    if data_dir:
        return Path(data_dir)
    for name in ("config.run.json", "run.json"):
        d = (read_json(Path(run) / name) or {}).get("data_dir")
        if d:
            return Path(d)
    return None


def coconot_categories(data_dir: Path | None, level: str = "subcategory") -> list[str]:
    """The unsafe CoCoNot labels: subcategories of "Requests with safety concerns" (or the top-level categories)."""
    if data_dir is None or not (Path(data_dir) / "coconot.jsonl").is_file():
        return []
    found: set[str] = set()
    for line in (Path(data_dir) / "coconot.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("subset", "original") != "original":
            continue
        if level == "category":
            found.add(str(row.get("category")))
        elif row.get("category") == SAFETY and row.get("subcategory"):
            found.add(str(row["subcategory"]))
    return sorted(found)


def categories(run: Path, features: pd.DataFrame, data_dir: str | None = None) -> list[str]:
    """The categories annotators choose from: the taxonomy's own list (its summary.json "categories"), else the
    CoCoNot labels at the taxonomy's level from the data directory; every label of features.parquet is added."""
    summary = read_json(Path(run) / TAXONOMY_SUMMARY) or {}
    listed = summary.get("categories")
    if isinstance(listed, dict):
        listed = list(listed)
    cats = [str(c) for c in listed] if isinstance(listed, list) else []
    if not cats:
        level = (summary.get("options") or {}).get("level", "subcategory")
        cats = coconot_categories(_data_dir(run, data_dir), level)
    seen = set(cats)
    for labels in activation_labels(features).values():
        for c in sorted(labels - seen):
            cats.append(c)
            seen.add(c)
    if not cats:
        raise RefusalScopeError(f"no CoCoNot categories found: {run}/{TAXONOMY_SUMMARY} lists none and no "
                                "coconot.jsonl was found (pass --data-dir)")
    return cats


def read_explanations(run: Path) -> dict[str, dict]:
    """feature → its explanation record ({"text", "source", "contexts", ...}); empty when the run has none."""
    data = read_json(Path(run) / EXPLANATIONS) or {}
    feats = data.get("features", data)
    return {str(k): v for k, v in feats.items() if isinstance(v, dict)} if isinstance(feats, dict) else {}


def display_contexts(record: dict | None, n: int = 5) -> list[dict]:
    """Up to ``n`` top-activating contexts, highest first, as {"tokens": [(text, is_top)], "top_token", "top_value",
    "prompt"}, whatever fields the explainer left out."""
    out = []
    for ctx in (record or {}).get("contexts") or []:
        if not isinstance(ctx, dict):
            continue
        tokens = [str(t) for t in ctx.get("tokens") or []]
        acts = list(ctx.get("activations") or [])
        top = ctx.get("top_index")
        if top is None and acts:
            top = max(range(len(acts)), key=lambda i: acts[i])
        value = ctx.get("top_value")
        if value is None and top is not None and 0 <= int(top) < len(acts):
            value = acts[int(top)]
        top_token = ctx.get("top_token")
        if top_token is None and top is not None and 0 <= int(top) < len(tokens):
            top_token = tokens[int(top)]
        out.append({"tokens": [(t, top is not None and i == int(top)) for i, t in enumerate(tokens)],
                    "top_token": "" if top_token is None else str(top_token),
                    "top_value": _number(value), "prompt": str(ctx.get("prompt") or "")})
    out.sort(key=lambda c: -(c["top_value"] if c["top_value"] is not None else float("-inf")))
    return out[:n]


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
