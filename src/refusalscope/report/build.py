"""``refusalscope report RUN``: one self-contained HTML file of a run (every figure and style embedded, no script,
opens offline), built from the run's files only with a Jinja2 template whose autoescaping makes every string from
the run (prompts, completions, explanations) show as text."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from refusalscope import __version__
from refusalscope.errors import RefusalScopeError
from refusalscope.report.blocks import RunFiles, Section
from refusalscope.report.drilldown import drilldown_section
from refusalscope.report.sections import SECTIONS, build_section
from refusalscope.store import RunStore

REPORT = "report.html"
# no script may run in the report at all: images only from data URIs, styles only inline
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def environment() -> Environment:
    return Environment(loader=PackageLoader("refusalscope.report", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def build_report(opts) -> tuple[Path, list[Section]]:
    """Write the report of ``opts.run`` (to ``opts.out``, default RUN/report.html); returns (path, sections)."""
    root = Path(opts.run).expanduser()
    if not root.is_dir():
        raise RefusalScopeError(f"run directory {root} does not exist")
    start = time.perf_counter()
    files = RunFiles(root)
    sections = [build_section(b, files, opts) for b in [*SECTIONS, drilldown_section]]
    html = environment().get_template("report.html.j2").render(
        run=files.shown, name=root.resolve().name, sections=sections, csp=CSP, version=__version__,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=round(time.perf_counter() - start, 1))
    out = Path(opts.out).expanduser() if opts.out else root / REPORT
    RunStore(out.parent).write_text(out.name, html)
    return out, sections

