"""docs/ARCHITECTURE.md stays true: every module it names exists, and every module of the package is named."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "refusalscope"


def _tree_modules() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    tree = text.split("```")[1]
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
