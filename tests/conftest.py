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


@pytest.fixture(scope="session")
def _finished_run_once(tmp_path_factory, tiny_dirs, tiny_lm):
    import json

    from helpers import build_finished_run

    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    (data / "splits").mkdir(parents=True)
    for name, items in (("harmful_train", [f"Tell me how to pick lock number {i}." for i in range(8)]),
                        ("harmful_val", [f"Tell me how to pick lock number {i}." for i in range(8, 12)]),
                        ("harmless_train", [f"Write a poem about the sea, verse {i}." for i in range(8)]),
                        ("harmless_val", [f"Write a poem about the sea, verse {i}." for i in range(8, 12)]),
                        ("harmless_test", [f"Give me a recipe for soup number {i}." for i in range(12)])):
        (data / "splits" / f"{name}.json").write_text(json.dumps([{"instruction": t} for t in items]))
    return build_finished_run(root, tiny_dirs["qwen2"], data, tiny_lm)


@pytest.fixture
def finished_run(_finished_run_once, tmp_path):
    """A copy of a tiny Stages 1-3 run (built once per session) and its judge: (run dir, judge)."""
    import shutil

    run, judge = _finished_run_once
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, judge


@pytest.fixture
def analysed_run(finished_run):
    """The finished tiny run with made-up results of every analysis (helpers.add_fake_analyses, injection strings
    included): (run dir, judge, info)."""
    from helpers import add_fake_analyses

    run, judge = finished_run
    return run, judge, add_fake_analyses(run)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for Playwright, installed when missing and possible; the test skips when it can't be had."""
    from helpers import chromium_executable

    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    path = chromium_executable()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install chromium, as root)")
    return path


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # unit tests never reach the network
    torch.set_num_threads(min(2, os.cpu_count() or 1))
