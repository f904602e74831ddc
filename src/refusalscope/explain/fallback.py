"""The offline fallback explanation: one line naming the tokens a feature fires on most in its top contexts, so
every feature has some text even without Neuronpedia or an LLM, e.g. ``fires on "sorry", "cannot" (local contexts)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from refusalscope.explain.records import TopContext

PREFIX = "fires on "
SUFFIX = " (local contexts)"
NEVER = "never fired on the context corpus (local contexts)"


def shown(token: str) -> str:
    """A token as the fallback line shows it: surrounding spaces dropped; whitespace-only tokens escaped."""
    text = token.strip()
    return text if text else token.encode("unicode_escape").decode("ascii")


def top_tokens(contexts: Sequence[TopContext], k: int = 3) -> list[str]:
    """The ``k`` tokens with the largest summed activation over the contexts (our choice: summed activation, so a
    token that is top in several contexts outranks one strong occurrence); ties keep first-seen order."""
    total: dict[str, float] = {}
    for c in contexts:
        for tok, act in zip(c.tokens, c.activations):
            if act > 0 and tok:
                key = shown(tok)
                total[key] = total.get(key, 0.0) + float(act)
    return [t for t, _ in sorted(total.items(), key=lambda kv: -kv[1])[:k]]


def describe(contexts: Sequence[TopContext], k: int = 3) -> str:
    tokens = top_tokens(contexts, k)
    if not tokens:
        return NEVER
    return PREFIX + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens) + SUFFIX


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def terms_of(text: str) -> list[str] | None:
    """The tokens a fallback line names (None when ``text`` is not a fallback line)."""
    if text == NEVER:
        return []
    if not (text.startswith(PREFIX) and text.endswith(SUFFIX)):
        return None
    return [json.loads(f'"{m}"') for m in _QUOTED.findall(text[len(PREFIX):-len(SUFFIX)])]
