"""The explanation record of one feature and the run-store files that hold them.

``analyses/explain/explanations.json`` is ``{"features": {"L17/1204": Explanation}}``; the report and the annotation
app read it in exactly this shape. ``analyses/explain/explanations.parquet`` is the same, flat.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from pydantic import BaseModel, Field

from refusalscope.saes.features import Feature

# Which backend wrote an explanation's text.
SOURCES = ("neuronpedia", "llm", "local-fallback")

EXPLANATIONS_JSON = "analyses/explain/explanations.json"
EXPLANATIONS_TABLE = "analyses/explain/explanations.parquet"


class TopContext(BaseModel):
    """One top-activating context: tokens around the max-activating token with the feature's activation on each."""

    tokens: list[str]
    activations: list[float]
    top_index: int  # index of the max-activating token in ``tokens``
    top_token: str
    top_value: float
    prompt: str = ""  # the corpus text the context comes from


class Explanation(BaseModel):
    feature: str  # "L17/1204"
    text: str
    source: str  # one of SOURCES
    groups: list[str] = Field(default_factory=list)  # stage1, stage2, stage3, hydra, random, ...
    contexts: list[TopContext] = Field(default_factory=list)


def explanations_json(records: Mapping[Feature, Explanation]) -> dict:
    return {"features": {str(f): r.model_dump(mode="json") for f, r in sorted(records.items())}}


def read_explanations(obj: dict) -> dict[Feature, Explanation]:
    return {Feature.parse(k): Explanation.model_validate(v) for k, v in obj.get("features", {}).items()}


def explanations_table(records: Mapping[Feature, Explanation]) -> pd.DataFrame:
    """One row per feature: feature, layer, latent, text, source, groups, top_token, top_value (of its best
    context; empty and NaN when the corpus never made it fire)."""
    rows = []
    for f, r in sorted(records.items()):
        best = max(r.contexts, key=lambda c: c.top_value, default=None)
        rows.append({"feature": str(f), "layer": f.layer, "latent": f.latent, "text": r.text, "source": r.source,
                     "groups": list(r.groups), "top_token": best.top_token if best else "",
                     "top_value": best.top_value if best else float("nan")})
    columns = ["feature", "layer", "latent", "text", "source", "groups", "top_token", "top_value"]
    return pd.DataFrame(rows, columns=columns)
