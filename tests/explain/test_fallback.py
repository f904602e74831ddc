"""The offline fallback line: the tokens a feature fires on most in its top contexts, and reading them back."""

from __future__ import annotations

from refusalscope.explain.fallback import NEVER, describe, terms_of, top_tokens
from refusalscope.explain.records import TopContext


def _ctx(pairs):
    tokens, acts = zip(*pairs)
    top = max(range(len(acts)), key=acts.__getitem__)
    return TopContext(tokens=list(tokens), activations=list(acts), top_index=top, top_token=tokens[top],
                      top_value=acts[top])


def test_tokens_ranked_by_summed_activation():
    contexts = [_ctx([(" I", 0.0), (" cannot", 3.0), (" help", 0.5)]),
                _ctx([(" sorry", 5.0), (" cannot", 2.5), ("\n", 1.0)]),
                _ctx([(" illegal", 4.0), (" cannot", 0.1)])]
    # "cannot": 3 + 2.5 + 0.1 = 5.6 beats the single strong "sorry" (5.0); leading spaces dropped
    assert top_tokens(contexts, 3) == ["cannot", "sorry", "illegal"]
    assert describe(contexts) == 'fires on "cannot", "sorry", "illegal" (local contexts)'
    assert top_tokens(contexts, 5) == ["cannot", "sorry", "illegal", "\\n", "help"]  # whitespace escaped


def test_never_fired_and_round_trip():
    assert describe([]) == NEVER and terms_of(NEVER) == []
    odd = [_ctx([('say "no"', 2.0), ("\\", 1.0), ("\t", 0.5)])]
    line = describe(odd)
    assert terms_of(line) == ['say "no"', "\\", "\\t"]
    assert terms_of("weapons and explosives") is None
