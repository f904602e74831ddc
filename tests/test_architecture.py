"""docs/ARCHITECTURE.md stays true: every module it names exists, and every module of the package and every
benchmark is named."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "refusalscope"


def _tree_modules(block: int = 1) -> set[str]:
    """Paths named by the ``block``-th fenced tree of ARCHITECTURE.md (1: the package, 3: benchmarks/)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    tree = text.split("```")[block]
    found, stack = set(), []
    for line in tree.splitlines()[1:]:
        m = re.match(r"^([│ ]*)(?:├── |└── )([\w.]+/?)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        name = m.group(2)
        stack = stack[:depth]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            found.add("/".join([*stack, name]))
    return found


def test_architecture_tree_matches_the_package():
    named = _tree_modules()
    actual = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert named, "no tree found in docs/ARCHITECTURE.md"
    assert sorted(named - actual) == [], "named in ARCHITECTURE.md but missing"
    assert sorted(actual - named) == [], "modules missing from ARCHITECTURE.md"


def test_architecture_names_every_benchmark():
    named = _tree_modules(3)
    bench = ROOT / "benchmarks"
    actual = {p.name for p in bench.iterdir() if p.suffix in {".py", ".sh", ".md"}}
    assert "pipeline_gpu.py" in named, "no benchmarks tree found in docs/ARCHITECTURE.md"
    assert sorted(named - actual) == [], "named in ARCHITECTURE.md's benchmarks tree but missing"
    assert sorted(actual - named) == [], "benchmarks missing from ARCHITECTURE.md"
