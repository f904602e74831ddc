"""Prompt sets: a registry of the standard refusal sets plus any CSV/JSON/JSONL/TXT file.

Resolution order for a name: an explicit path, then the data directory (``--data-dir`` or ``REFUSALSCOPE_DATA``),
then the Hugging Face hub when online (sets that have a hub copy).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refusalscope.errors import RefusalScopeError


@dataclass(frozen=True)
class DatasetEntry:
    file: str  # relative to the data directory
    column: str
    harmful: bool | None
    query: str | None = None  # pandas query selecting rows, e.g. "label == 'safe'"
    hub: tuple[str, str, str] | None = None  # (dataset id, split, column)
    description: str = ""


DATASETS: dict[str, DatasetEntry] = {
    "advbench": DatasetEntry("advbench.csv", "goal", True, hub=("walledai/AdvBench", "train", "prompt"),
                             description="520 harmful behaviours (Zou et al. 2023)"),
    "alpaca": DatasetEntry("alpaca.json", "instruction", False, hub=("tatsu-lab/alpaca", "train", "instruction"),
                           description="2,000 harmless input-free Alpaca instructions (FM pool)"),
    "harmbench_val": DatasetEntry("harmbench_val.json", "instruction", True,
                                  description="41 HarmBench validation behaviours with categories"),
    "harmful_train": DatasetEntry("splits/harmful_train.json", "instruction", True,
                                  description="260 harmful (117 AdvBench, 88 MaliciousInstruct, 55 TDC2023)"),
    "harmful_val": DatasetEntry("splits/harmful_val.json", "instruction", True,
                                description="39 harmful (HarmBench val)"),
    "harmless_train": DatasetEntry("splits/harmless_train.json", "instruction", False, description="1,000 Alpaca"),
    "harmless_val": DatasetEntry("splits/harmless_val.json", "instruction", False, description="1,000 Alpaca"),
    "harmless_test": DatasetEntry("splits/harmless_test.json", "instruction", False, description="1,000 Alpaca"),
    "xstest": DatasetEntry("xstest.csv", "prompt", None, hub=("walledai/XSTest", "test", "prompt"),
                           description="450 XSTest prompts (250 safe, 200 unsafe contrast)"),
    "xstest_safe": DatasetEntry("xstest.csv", "prompt", False, query="label == 'safe'"),
    "xstest_unsafe": DatasetEntry("xstest.csv", "prompt", True, query="label == 'unsafe'"),
    "coconot": DatasetEntry("coconot.jsonl", "prompt", None, description="1,380 CoCoNot prompts with taxonomy"),
    "coconot_original": DatasetEntry("coconot.jsonl", "prompt", True, query="subset == 'original'"),
    "coconot_contrast": DatasetEntry("coconot.jsonl", "prompt", False, query="subset == 'contrast'"),
}

_TEXT_COLUMNS = ("instruction", "prompt", "goal", "text", "behavior", "question")


@dataclass
class PromptSet:
    """Deduplicated prompts and their source rows (extra columns such as ``category`` stay in ``frame``)."""

    name: str
    texts: list[str]
    frame: pd.DataFrame = field(repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> "PromptSet":
        if n is None:
            return self
        if n < 1:
            raise RefusalScopeError(f"--limit must be at least 1, got {n}")
        return PromptSet(self.name, self.texts[:n], self.frame.iloc[:n].reset_index(drop=True), self.source)

    def subset(self, keep: Sequence[bool]) -> "PromptSet":
        frame = self.frame[list(keep)].reset_index(drop=True)
        return PromptSet(self.name, [t for t, k in zip(self.texts, keep) if k], frame, self.source)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    value = data_dir or os.environ.get("REFUSALSCOPE_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise RefusalScopeError(f"data directory {path} does not exist")
    return path


def _frame_from_items(items: list) -> pd.DataFrame:
    """A list of strings becomes a ``text`` column; a list of objects, one column per key."""
    if items and all(isinstance(x, str) for x in items):
        return pd.DataFrame({"text": items})
    return pd.DataFrame(items)


def read_prompt_file(path: Path) -> pd.DataFrame:
    """Read .csv, .json (list of objects or strings), .jsonl or .txt (one prompt a line) into a DataFrame."""
    if not path.is_file():
        raise RefusalScopeError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False)
        if suffix == ".jsonl":
            return _frame_from_items([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if suffix == ".json":
            obj = json.loads(path.read_text())
            if isinstance(obj, dict):  # {"data": [...]} or {"instructions": [...]}
                lists = [v for v in obj.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise RefusalScopeError(f"{path}: a JSON object must hold exactly one list of prompts")
                obj = lists[0]
            return _frame_from_items(obj)
        if suffix in (".txt", ""):
            return pd.DataFrame({"text": [line.strip() for line in path.read_text().splitlines() if line.strip()]})
    except (ValueError, json.JSONDecodeError, pd.errors.ParserError) as e:
        raise RefusalScopeError(f"could not parse {path}: {e}") from None
    raise RefusalScopeError(f"unsupported dataset format {suffix!r} for {path}; use .csv, .json, .jsonl or .txt")


def _pick_column(frame: pd.DataFrame, column: str | None, where: str) -> str:
    if column is not None:
        if column not in frame.columns:
            raise RefusalScopeError(f"column {column!r} not in {where}; it has: {', '.join(map(str, frame.columns))}")
        return column
    for c in _TEXT_COLUMNS:
        if c in frame.columns:
            return c
    if len(frame.columns) == 1:
        return frame.columns[0]
    columns = ", ".join(map(str, frame.columns))
    raise RefusalScopeError(f"cannot tell which column of {where} holds the prompts ({columns}); pass --column")


def _from_hub(name: str, entry: DatasetEntry) -> pd.DataFrame:
    if entry.hub is None:
        raise RefusalScopeError(f"dataset {name!r} has no hub copy: pass --data-dir (or set REFUSALSCOPE_DATA)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        raise RefusalScopeError(f"dataset {name!r} needs --data-dir: no data directory given and the hub is offline")
    hub_id, split, column = entry.hub
    try:
        import datasets  # optional: only for the hub fallback

        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:
        raise RefusalScopeError(f"dataset {name!r}: no data directory given and {hub_id} could not be loaded from "
                                f"the hub ({type(e).__name__}); pass --data-dir") from None
    frame = ds.to_pandas()
    if name == "alpaca" and "input" in frame.columns:
        frame = frame[frame["input"] == ""]
    return frame.rename(columns={column: entry.column})


def dedupe(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each prompt (whitespace-trimmed, case kept)."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        key = " ".join(t.split())
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def load_prompts(spec: str, *, data_dir: str | os.PathLike | None = None, column: str | None = None,
                 limit: int | None = None) -> PromptSet:
    """Load a named set (see ``DATASETS``) or a file; deduplicated, empty prompts dropped, never empty."""
    path = Path(spec).expanduser()
    entry = DATASETS.get(spec)
    if entry is None and (path.suffix or path.exists() or os.sep in spec):
        frame, source, name = read_prompt_file(path), str(path), path.stem
    elif entry is not None:
        root = resolve_data_dir(data_dir)
        name = spec
        if root is not None:
            source = str(root / entry.file)
            frame = read_prompt_file(root / entry.file)
        else:
            source = f"hub:{entry.hub[0] if entry.hub else '?'}"
            frame = _from_hub(spec, entry)
        if entry.query:
            frame = frame.query(entry.query)
        column = column or entry.column
    else:
        raise RefusalScopeError(f"unknown dataset {spec!r}: not a file and not one of {', '.join(DATASETS)}")
    col = _pick_column(frame, column, source)
    frame = frame[frame[col].notna()].reset_index(drop=True)  # rows without the field are no prompts
    texts = [str(t).strip() for t in frame[col].tolist()]
    keep = dedupe(texts)
    frame = frame.iloc[keep].reset_index(drop=True)
    result = PromptSet(name, [texts[i] for i in keep], frame, source)
    if len(result) == 0:
        raise RefusalScopeError(f"dataset {spec!r} ({source}) holds no prompts in column {col!r}")
    return result.head(limit)


def overlap(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Prompts of ``b`` that also occur in ``a`` (whitespace-normalised)."""
    keys = {" ".join(t.split()) for t in a}
    return [t for t in b if " ".join(t.split()) in keys]


def check_disjoint(train: Sequence[str], evaluation: Sequence[str], *, what: str, allow: bool = False) -> None:
    """Refuse evaluation prompts that were also training prompts (e.g. harmful_train holds 117 AdvBench goals)."""
    shared = overlap(train, evaluation)
    if shared and not allow:
        raise RefusalScopeError(
            f"{len(shared)} {what} prompts are also training prompts (e.g. {shared[0][:70]!r}); evaluating on them "
            "leaks. Choose disjoint sets, drop the overlap, or pass --allow-overlap"
        )


def drop_overlap(train: Sequence[str], evaluation: PromptSet) -> tuple[PromptSet, int]:
    keys = {" ".join(t.split()) for t in train}
    keep = [" ".join(t.split()) not in keys for t in evaluation.texts]
    return evaluation.subset(keep), keep.count(False)


def split(items: Sequence, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> list[list]:
    """Seeded shuffle, then consecutive slices of the given fractions (the last takes the remainder)."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise RefusalScopeError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for k, f in enumerate(fractions):
        end = len(order) if k == len(fractions) - 1 else start + round(f * len(order))
        out.append([items[i] for i in order[start:end]])
        start = end
    return out
