"""The analyses as plugins over a finished run: ``refusalscope analyze NAME --run RUN`` and ``run_analysis``.

An analysis is a module with:
- ``NEEDS``: what the run must hold first ("stage2", "stage3", "hydra", ...), checked before anything is loaded;
- ``run(finished: FinishedRun, settings, progress: bool) -> dict``: does the work, writes its tables and figure
  under ``analyses/NAME/`` and returns its summary (JSON-able);
- ``summary_lines(summary: dict) -> list[str]``: what the command prints.
``run_analysis`` checks the prerequisites, calls ``run`` and writes ``analyses/NAME/summary.json`` (with the
resolved options), which is how later analyses and the report know it ran.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType

from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.config import ANALYSIS_SETTINGS, AnalyzeSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.judges import Judge

# analysis name -> module (imported only when that analysis runs)
MODULES = {
    "hydra": "refusalscope.analysis.hydra",
    "controls": "refusalscope.analysis.obrien",
    "ce": "refusalscope.analysis.ce_loss",
    "clamp": "refusalscope.analysis.clamping",
    "taxonomy": "refusalscope.analysis.taxonomy",
    "explain": "refusalscope.explain.run",
}
assert set(MODULES) == set(ANALYSIS_SETTINGS)


def analysis_module(name: str) -> ModuleType:
    if name not in MODULES:
        raise RefusalScopeError(f"unknown analysis {name!r}; choose one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def output_dir(name: str) -> str:
    """Where an analysis writes, relative to the run directory."""
    return f"analyses/{name}"


def run_analysis(name: str, settings: AnalyzeSettings, *, progress: bool = True, judge: Judge | None = None) -> dict:
    """Run one analysis on a finished run; returns its summary (also in ``analyses/NAME/summary.json``)."""
    module = analysis_module(name)
    finished = FinishedRun(settings.run, judge=judge)
    finished.require(name, *getattr(module, "NEEDS", ()))
    start = time.perf_counter()
    summary = module.run(finished, settings, progress)
    summary = {"analysis": name, **summary, "seconds": round(time.perf_counter() - start, 1),
               "options": settings.model_dump(mode="json", exclude={"run"})}
    finished.store.write_json(f"{output_dir(name)}/summary.json", summary)
    return summary
