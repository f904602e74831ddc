"""The run store: one directory per run that every stage reads from and writes to.

Files are written to a temporary name and renamed, so a crash never leaves a half-written file behind.
Tables are Parquet (``pandas.read_parquet``), metadata JSON, tensors safetensors, plots PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from refusalscope.errors import RefusalScopeError


def digest(obj) -> str:
    """A short stable hash of a JSON-able value: how steps record the inputs their outputs depend on."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600; run files should follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _corrupt(p: Path, e: Exception) -> RefusalScopeError:
    return RefusalScopeError(f"{p} could not be read ({type(e).__name__}: {e}); the run may be corrupt")


RUN_PREFIX = "run:"  # a path inside the run directory, relative to it ("run:." is the directory itself)


class RunStore:
    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RefusalScopeError(f"run directory {self.root} does not exist")

    def path(self, name: str) -> Path:
        return self.root / name

    def _inside(self, text: str) -> str | None:
        """``text``'s path relative to the run directory when it is an absolute path inside it, else None."""
        p = Path(text).expanduser()
        if not p.is_absolute():
            return None
        for path, root in ((p, self.root.absolute()), (p.resolve(), self.root.resolve())):
            if path == root or root in path.parents:
                return path.relative_to(root).as_posix() or "."
        return None

    def portable(self, obj):
        """``obj`` (a JSON-able value) with every absolute path inside the run directory written as ``run:REL``,
        so the directory holds no machine-specific path of its own and can move; other values are unchanged."""
        if isinstance(obj, dict):
            return {k: self.portable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.portable(v) for v in obj]
        if isinstance(obj, (str, os.PathLike)):
            rel = self._inside(os.fspath(obj))
            return RUN_PREFIX + rel if rel is not None else (obj if isinstance(obj, str) else os.fspath(obj))
        return obj

    def resolve(self, obj):
        """The inverse of ``portable``: every ``run:REL`` becomes the path under this run directory (where the run
        now lies)."""
        if isinstance(obj, dict):
            return {k: self.resolve(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.resolve(v) for v in obj]
        if isinstance(obj, str) and obj.startswith(RUN_PREFIX):
            return str((self.root / obj[len(RUN_PREFIX):]).absolute())
        return obj

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def write_json(self, name: str, obj) -> Path:
        text = json.dumps(obj, indent=2, default=str)
        return _atomic(self.path(name), lambda tmp: Path(tmp).write_text(text))

    def write_text(self, name: str, text: str) -> Path:
        return _atomic(self.path(name), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def read_json(self, name: str):
        p = self.path(name)
        if not p.is_file():
            raise RefusalScopeError(f"{p} is missing: run the step that writes it first")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RefusalScopeError(f"{p} is not valid JSON ({e}); the run may be corrupt") from None

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        return _atomic(self.path(name), lambda tmp: frame.to_parquet(tmp, index=False))

    def write_table_parts(self, name: str, parts, columns: dict[str, str]) -> Path:
        """One Parquet table from an iterable of pyarrow tables, one row group each, never all in memory (a table
        too large to build whole); ``columns``: name → pyarrow type name, the schema also when there are no parts."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, getattr(pa, t)()) for c, t in columns.items()])

        def write(tmp):
            with pq.ParquetWriter(tmp, schema) as writer:
                written = False
                for part in parts:
                    writer.write_table(part.select(list(columns)).cast(schema))
                    written = True
                if not written:  # one empty row group: readers of older pyarrow fail on a file with none
                    writer.write_table(schema.empty_table())

        return _atomic(self.path(name), write)

    def read_table(self, name: str) -> pd.DataFrame:
        p = self.path(name)
        if not p.is_file():
            raise RefusalScopeError(f"{p} is missing: run the step that writes it first")
        try:
            return pd.read_parquet(p)
        except Exception as e:
            raise _corrupt(p, e) from None

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        from safetensors.torch import save_file

        meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return _atomic(self.path(name), lambda tmp: save_file(flat, tmp, metadata=meta))

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open

        p = self.path(name)
        if not p.is_file():
            raise RefusalScopeError(f"{p} is missing: run the step that writes it first")
        try:
            with safe_open(str(p), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except Exception as e:
            raise _corrupt(p, e) from None
        return tensors, meta

    def save_figure(self, name: str, fig) -> Path:
        """Write a matplotlib figure as PNG, then close it (pyplot keeps every open figure alive)."""
        import matplotlib.pyplot as plt

        try:
            return _atomic(self.path(name), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        finally:
            plt.close(fig)
