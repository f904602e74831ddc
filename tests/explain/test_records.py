"""Explanation records: the JSON shape the report and the annotation app read, and the flat table."""

from __future__ import annotations

import json
import math

from refusalscope.explain.records import (
    Explanation,
    TopContext,
    explanations_json,
    explanations_table,
    read_explanations,
)
from refusalscope.saes.features import Feature


def _records():
    ctx = [TopContext(tokens=["a", " bomb"], activations=[0.1, 3.0], top_index=1, top_token=" bomb", top_value=3.0,
                      prompt="a bomb"),
           TopContext(tokens=["gun"], activations=[5.0], top_index=0, top_token="gun", top_value=5.0, prompt="gun")]
    return {Feature(17, 1204): Explanation(feature="L17/1204", text="weapons", source="llm", groups=["stage2"],
                                           contexts=ctx),
            Feature(3, 9): Explanation(feature="L3/9", text="never fired", source="local-fallback",
                                       groups=["random"])}


def test_json_shape_is_the_shared_contract():
    obj = json.loads(json.dumps(explanations_json(_records())))
    assert list(obj) == ["features"] and list(obj["features"]) == ["L3/9", "L17/1204"]
    rec = obj["features"]["L17/1204"]
    assert set(rec) == {"feature", "text", "source", "groups", "contexts"}
    assert set(rec["contexts"][0]) == {"tokens", "activations", "top_index", "top_token", "top_value", "prompt"}
    assert read_explanations(obj) == _records()


def test_flat_table_takes_the_best_context():
    t = explanations_table(_records())
    assert list(t.columns) == ["feature", "layer", "latent", "text", "source", "groups", "top_token", "top_value"]
    row = t.set_index("feature").loc["L17/1204"]
    assert (row.layer, row.latent, row.top_token, row.top_value) == (17, 1204, "gun", 5.0)
    empty = t.set_index("feature").loc["L3/9"]
    assert empty.top_token == "" and math.isnan(empty.top_value)
