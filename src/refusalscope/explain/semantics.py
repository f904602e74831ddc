"""The feature-semantics tables: the most frequent content words across explanations (paper, Table 4) and a
keyword grouping of explanations into themes (paper, Tables 7, 8, 10, 11), with the keyword lists in an editable
TOML file (``themes.toml`` in this package by default).

Pure functions over explanation texts; ``explain/run.py`` writes their tables.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from refusalscope.errors import RefusalScopeError
from refusalscope.explain import fallback

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_THEMES = Path(__file__).with_name("themes.toml")
OTHER = "other"

# Our choice: English function words plus the boilerplate of auto-interp explanations ("references to", "related
# to", "phrases"), which would otherwise top every list without saying what a feature is about.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either etc few for from further had has have having he her here
hers him his how i if in into is it its itself just like may me more most my no nor not of off often on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up upon us very via was we were what when where which while who whom why will with
within without would you your
activation activations activate activates concept concepts context contexts contain contains containing content
denote denotes describing detect detects element elements expression expressions feature features fires indicate
indicates instance instances involving mention mentions mentioned neuron occurrence occurrences particular
particularly pattern patterns phrase phrases presence reference references referring related relating specific
specifically term terms text texts token tokens type types typically usage use used various word words
""".split()) | frozenset(
    # our choice: the words of chat-template markers (<|im_start|>assistant, <|eot_id|>, <start_of_turn>model) say
    # where a feature fires, not what it is about; the "chat-roles" theme still counts them
    "im start end assistant user system model turn bos eos endoftext eot id header begin".split())

_WORD = re.compile(r"[a-z][a-z'\-]*[a-z]|[a-z]")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})


def semantic_text(text: str) -> str:
    """What an explanation says: a fallback line contributes only the tokens it names."""
    terms = fallback.terms_of(text)
    return text if terms is None else " ".join(terms)


def content_words(text: str, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    words = _WORD.findall(semantic_text(text).translate(_APOSTROPHES).lower())
    return [w for w in words if w not in stop_words and len(w) > 1]


def top_terms(texts: Sequence[str], n: int = 30) -> pd.DataFrame:
    """Table 4: the ``n`` content words in most explanations (each counted once per explanation, our choice, so a
    long explanation does not outweigh others); columns term, count, share (of explanations)."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(set(content_words(t)))
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    total = max(len(texts), 1)
    return pd.DataFrame([{"term": w, "count": c, "share": c / total} for w, c in rows],
                        columns=["term", "count", "share"])


# ---- themes -----------------------------------------------------------------------------------------------------

def load_themes(path: str | Path | None = None) -> dict[str, list[str]]:
    """theme → keywords from a TOML file with a ``[themes]`` table (default: the packaged ``themes.toml``)."""
    p = Path(path).expanduser() if path else DEFAULT_THEMES
    if not p.is_file():
        raise RefusalScopeError(f"themes file not found: {p}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RefusalScopeError(f"themes file {p} is not valid TOML: {e}") from None
    themes = data.get("themes")
    if not isinstance(themes, dict) or not themes:
        raise RefusalScopeError(f"themes file {p} needs a [themes] table of theme = [\"keyword\", ...]")
    for name, words in themes.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise RefusalScopeError(f"theme {name!r} in {p} must be a non-empty list of keywords")
        if name == OTHER:
            raise RefusalScopeError(f"{p}: '{OTHER}' is reserved for explanations that match no theme")
    return {name: [w.strip().lower() for w in words] for name, words in themes.items()}


def keyword_pattern(keyword: str) -> re.Pattern:
    """Whole words with an optional plural s; a trailing * makes the last word a prefix; words form a phrase."""
    words = keyword.translate(_APOSTROPHES).split()
    parts = [re.escape(w) for w in words]
    parts[-1] = re.escape(words[-1].rstrip("*")) + (r"[\w'\-]*" if words[-1].endswith("*") else "s?")
    return re.compile(r"(?<![\w'])" + r"\s+".join(parts) + r"(?![\w'])")


def theme_hits(text: str, themes: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """theme → number of its keywords found in the explanation (themes without a match left out)."""
    body = semantic_text(text).translate(_APOSTROPHES).lower()
    out = {}
    for theme, words in themes.items():
        n = sum(bool(keyword_pattern(w).search(body)) for w in words)
        if n:
            out[theme] = n
    return out


def assign_themes(texts: Mapping[str, str], themes: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per feature: feature, theme (primary: most keyword matches, ties by file order; "other" when none),
    themes (every matching theme, in file order)."""
    order = {t: i for i, t in enumerate(themes)}
    rows = []
    for feature, text in texts.items():
        hits = theme_hits(text, themes)
        primary = min(hits, key=lambda t: (-hits[t], order[t])) if hits else OTHER
        rows.append({"feature": feature, "theme": primary, "themes": sorted(hits, key=order.get) or [OTHER]})
    return pd.DataFrame(rows, columns=["feature", "theme", "themes"])


def theme_table(assigned: pd.DataFrame, themes: Sequence[str], n_examples: int = 5) -> pd.DataFrame:
    """Tables 7/8/10/11: per theme (file order, then "other"), the features with it among their themes
    (n_features, share of all features) and up to ``n_examples`` example features (primary theme first)."""
    total = max(len(assigned), 1)
    rows = []
    for theme in [*themes, OTHER]:
        members = assigned[assigned["themes"].apply(lambda ts: theme in list(ts))]
        first = members.sort_values("theme", key=lambda s: s != theme, kind="stable")
        rows.append({"theme": theme, "n_features": len(members), "share": len(members) / total,
                     "n_primary": int((assigned["theme"] == theme).sum()),
                     "examples": first["feature"].head(n_examples).tolist()})
    return pd.DataFrame(rows, columns=["theme", "n_features", "share", "n_primary", "examples"])
