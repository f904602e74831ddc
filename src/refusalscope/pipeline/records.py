"""The per-prompt record of a run (``prompts/<id>.json``): what each stage found for one prompt.

A finished prompt is one file, written atomically; a rerun reuses it when its ``settings`` match the run's.
"""

from __future__ import annotations

from pydantic import BaseModel

from refusalscope.analysis.controls import ControlsResult
from refusalscope.stages.stage1 import Stage1Result
from refusalscope.stages.stage2 import Stage2Result


def without(obj, key: str):
    """A record's JSON form with every field named ``key`` dropped, at any depth."""
    if isinstance(obj, dict):
        return {k: without(v, key) for k, v in obj.items() if k != key}
    if isinstance(obj, list):
        return [without(v, key) for v in obj]
    return obj


def untimed(obj):
    """A record's JSON form without its wall-clock fields (``seconds``), the only part that may differ between
    two computations of the same results with the same settings."""
    return without(obj, "seconds")


class PromptRecord(BaseModel):
    id: int
    prompt: str
    settings: dict  # the options the results depend on (``steps.stage_key``)
    stage1: Stage1Result
    stage2: Stage2Result | None = None
    stage2_skipped: str | None = None  # why Stage 2 did not run (Stage 1 found no jailbreaking set)
    controls: ControlsResult | None = None

    @staticmethod
    def file_name(prompt_id: int) -> str:
        return f"prompts/{int(prompt_id):05d}.json"

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict) -> "PromptRecord | None":
        """The record, or None for a file written by an older layout (it is then recomputed)."""
        try:
            return cls.model_validate(data)
        except Exception:
            return None
