"""The report's building blocks: a run's files read defensively, and tables, key-value lists and figures turned into
plain data for the template (every string stays raw here; Jinja2's autoescaping makes it safe in the page)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Section:
    """One section of the report: its blocks, or the one line saying what to run when the run lacks the step."""

    key: str
    title: str
    paper: str = ""
    blocks: list[dict] = field(default_factory=list)
    missing: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "missing" if self.missing else "present"


class RunFiles:
    """Read access to a run directory that never raises: a missing file is None, an unreadable one is None plus a
    note in ``problems`` (the report says so in the section instead of failing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.problems: list[str] = []

    @property
    def shown(self) -> str:
        """How the report names the run in the commands it suggests: the path as given when relative, else the
        directory's name, since the report lives in the run directory and that moves between machines (issue 13)."""
        return str(self.root) if not self.root.is_absolute() else self.root.resolve().name

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, *names: str) -> bool:
        return any(self.path(n).exists() for n in names)

    def json(self, name: str):
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as e:
            self.problems.append(f"{name} could not be read ({type(e).__name__}: {e})")
            return None

    def table(self, name: str, head: int | None = None) -> pd.DataFrame | None:
        """The table, or (``head``) its first rows only, with the whole table's row count in
        ``frame.attrs["n_total"]`` (a preview of a table that would not fit in memory: hydra's edges)."""
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            if head is None:
                return pd.read_parquet(p)
            import pyarrow as pa
            import pyarrow.parquet as pq

            f = pq.ParquetFile(p)
            first = next(f.iter_batches(batch_size=max(head, 1)), None) if f.metadata.num_row_groups else None
            frame = (pa.Table.from_batches([first]) if first is not None else f.schema_arrow.empty_table()).to_pandas()
            frame.attrs["n_total"] = f.metadata.num_rows
            return frame.head(head)
        except Exception as e:
            self.problems.append(f"{name} could not be read ({type(e).__name__}: {e})")
            return None

    def image(self, name: str) -> str | None:
        """A PNG as a data URI (embedded, so the report opens offline)."""
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            data = p.read_bytes()
        except OSError as e:
            self.problems.append(f"{name} could not be read ({e})")
            return None
        if not data.startswith(PNG_MAGIC):
            self.problems.append(f"{name} is not a PNG file")
            return None
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def cell(value, max_chars: int = 400, max_items: int = 12) -> str:
    """One table cell as text: numbers rounded, lists shortened, long text cut (the drill-down has it whole)."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [cell(v, max_chars) for v in list(value)]
        more = f" … (+{len(items) - max_items})" if len(items) > max_items else ""
        return ", ".join(items[:max_items]) + more
    if isinstance(value, dict):
        value = json.dumps(value, default=str)
    text = str(value)
    return text if len(text) <= max_chars else text[:max_chars] + " …"


def table(frame: pd.DataFrame | None, title: str = "", *, columns: Sequence[str] | None = None,
          max_rows: int = 200, note: str = "") -> dict | None:
    """A DataFrame as a table block (None when there is no frame)."""
    if frame is None:
        return None
    cols = [c for c in columns if c in frame.columns] if columns else [str(c) for c in frame.columns]
    view = frame[cols] if columns else frame
    rows = [[cell(v) for v in row] for row in view.head(max_rows).itertuples(index=False)]
    n_total = frame.attrs.get("n_total", len(frame))  # a head read by ``RunFiles.table`` knows the whole count
    return {"kind": "table", "title": title, "columns": cols, "rows": rows, "n_total": n_total,
            "truncated": n_total > max_rows, "note": note}


def flatten(data: Mapping, prefix: str = "", skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, text) pairs."""
    out = []
    skip = set(skip)
    for key, value in data.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += flatten(value, name + ".")
        else:
            out.append((name, cell(value, max_items=24)))
    return out


def pairs(data: Mapping | None, title: str = "", *, skip: Iterable[str] = (), keys: Sequence[str] | None = None,
          collapsed: bool = False) -> dict | None:
    """A key-value block of a JSON object (only ``keys`` when given)."""
    if not isinstance(data, Mapping):
        return None
    if keys is not None:
        data = {k: data[k] for k in keys if k in data}
    items = flatten(data, skip=skip)
    return {"kind": "pairs", "title": title, "items": items, "collapsed": collapsed} if items else None


def image(uri: str | None, title: str, caption: str = "") -> dict | None:
    return {"kind": "image", "title": title, "uri": uri, "caption": caption} if uri else None


def text(line: str) -> dict:
    return {"kind": "text", "text": line}


def compact(blocks: Iterable[dict | None]) -> list[dict]:
    return [b for b in blocks if b]
