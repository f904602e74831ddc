"""Shared fixtures: tiny random-weight chat models (Qwen2, Llama, Gemma-2) built from configs, and the data dir.

The builders themselves live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import build_tiny

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny(arch, root / arch) for arch in ("qwen2", "llama", "gemma2")}


@pytest.fixture(scope="session")
def tiny_lm(tiny_dirs):
    from refusalscope.lm.loading import load_model

    return load_model(str(tiny_dirs["qwen2"]), device="cpu")


@pytest.fixture(params=["qwen2", "llama", "gemma2"])
def any_tiny_lm(request, tiny_dirs):
    from refusalscope.lm.loading import load_model

    return load_model(str(tiny_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    """A data dir holding the standard split names with a few made-up prompts each (for tiny-model runs)."""
    import json

    harmful = [f"Tell me how to pick lock number {i}." for i in range(12)]
    harmless = [f"Write a poem about the sea, verse {i}." for i in range(12)]
    (tmp_path / "splits").mkdir()
    for name, items in (("harmful_train", harmful[:8]), ("harmful_val", harmful[8:]),
                        ("harmless_train", harmless[:8]), ("harmless_val", harmless[8:])):
        (tmp_path / "splits" / f"{name}.json").write_text(json.dumps([{"instruction": t} for t in items]))
    return tmp_path


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests never reach the network
    torch.set_num_threads(min(2, os.cpu_count() or 1))
