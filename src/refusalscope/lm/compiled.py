"""Compiled generation (issue 13): a static key/value cache and ``torch.compile`` of the decode step, through
transformers' own auto-compile in ``generate``.

On a GPU a decode step of a 2B model is a few milliseconds of weight reads but tens of milliseconds of Python and
kernel launches (our hooks add ~10 small kernels per ablated layer), so replaying it as a CUDA graph can pay. A
compiled step is reused only while every shape it saw stays the same, so with compilation on we round the three
shapes that vary between calls up to buckets: generation rows, prompt length (left padding, masked) and the number
of latents each ablation hook touches (``LatentAblation.padded``: padding columns masked to zero). The prefill
runs eagerly, as transformers does it.

Modes: ``off``; ``cudagraphs`` (dynamo + CUDA graphs, no code generation: seconds to compile a shape);
``inductor`` (+ fused kernels, "reduce-overhead": minutes per shape); ``aot_eager`` (traces the same graph
without a GPU or a compiler: what the CPU tests use to check that graphs are captured and reused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusalscope.errors import RefusalScopeError

MODES = ("off", "cudagraphs", "inductor", "aot_eager")
# our choice: prompts left-padded to a multiple of 32 tokens (a few cache lengths over AdvBench's 30–110 tokens)
LENGTH_BUCKET = 32
# our choice: allow this many compiled shapes per process (torch's default, 8, is below a Stage-1 + Stage-3 run's)
RECOMPILE_LIMIT = 64


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RefusalScopeError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def bucket(n: int, least: int = 1) -> int:
    """The next power of two ≥ max(n, least): the sizes compiled shapes are rounded up to."""
    n = max(int(n), int(least), 1)
    return 1 << (n - 1).bit_length()


def padded_rows(rows: Sequence[int]) -> list[int]:
    """``rows`` with its last index repeated up to a power-of-two count (the repeats' outputs are dropped)."""
    rows = list(rows)
    return rows + rows[-1:] * (bucket(len(rows)) - len(rows)) if rows else rows


def generate_kwargs(mode: str, device: torch.device) -> dict:
    """Extra ``model.generate`` arguments for ``mode``: a static cache and transformers' compile config."""
    if check_mode(mode) == "off":
        return {}
    from transformers import CompileConfig

    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if mode == "inductor":
        config = CompileConfig(backend="inductor", mode="reduce-overhead")
    else:  # the mode is ignored by these backends
        config = CompileConfig(backend=mode, mode=None)
    if torch.device(device).type != "cuda":
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    return {"cache_implementation": "static", "compile_config": config}
