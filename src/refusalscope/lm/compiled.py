"""Compiled generation (issue 13): a static key/value cache and a ``torch.compile``d decode step, through
transformers' own auto-compile in ``generate``.

On a GPU a decode step of a 2B model is a few milliseconds of weight reads but tens of milliseconds of Python and
kernel launches (our hooks add ~10 small kernels per ablated layer), so replaying it as a CUDA graph can pay. A
CUDA graph replays only while every tensor it reads keeps its shape and its address, so with compilation on:
- the shapes that vary between calls are rounded up to buckets: generation rows, prompt length (left padding,
  masked) and the number of latents each ablation hook touches (``LatentAblation.padded``, padding masked out);
- the tensors that change between calls are copied into buffers that live as long as the process
  (``persistent``): the ablation hooks' SAE columns and row masks, and the key/value cache (``static_cache``, one
  per row count, reset before each call).
The prefill runs eagerly, as transformers does it.

Modes: ``off``; ``inductor`` (torch's "reduce-overhead": fused kernels replayed as CUDA graphs, the GPU mode);
``aot_eager`` (captures the same graph without a GPU or a compiler: what the CPU tests use to check that graphs
are captured, reused and read fixed addresses). The plain ``cudagraphs`` backend is not offered: it treats no input
as static, so every replay would copy the model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from refusalscope.errors import RefusalScopeError

CompileMode = Literal["off", "inductor", "aot_eager"]
MODES: tuple[str, ...] = get_args(CompileMode)
# our choice: prompts left-padded to a multiple of 32 tokens (a few cache lengths over AdvBench's 30–110 tokens)
LENGTH_BUCKET = 32
# our choice: allow this many compiled graphs per process (torch's default, 8, is below a Stage-1 + Stage-3 run's)
RECOMPILE_LIMIT = 64

_BUFFERS: dict[tuple, torch.Tensor] = {}


def check_mode(mode: str) -> str:
    """``mode`` itself if it is one of ``MODES``; otherwise a one-line error."""
    if mode not in MODES:
        raise RefusalScopeError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def bucket(n: int, least: int = 1) -> int:
    """The next power of two ≥ max(n, least): the sizes compiled shapes are rounded up to (our choice: powers of
    two, so a handful of shapes cover every size at less than twice the work)."""
    n = max(int(n), int(least), 1)
    return 1 << (n - 1).bit_length()


def padded_rows(rows: Sequence[int], cap: int | None = None) -> list[int]:
    """``rows`` with its last index repeated up to a power-of-two count, but not past ``cap`` rows (the batch
    size: padding must not make a batch larger than the user allowed); the repeats' outputs are dropped."""
    rows = list(rows)
    target = bucket(len(rows)) if cap is None else min(bucket(len(rows)), max(cap, len(rows)))
    return rows + rows[-1:] * (target - len(rows)) if rows else rows


def persistent(key: tuple, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into this process's buffer for ``key`` (and its shape, dtype, device), made on first use:
    a compiled step reads it at the same address on every call. Two tensors of one forward need two keys."""
    k = (*key, tuple(value.shape), value.dtype, value.device)
    with torch.inference_mode():  # buffers are made and refilled in inference mode, so refilling always works
        buf = _BUFFERS.get(k)
        if buf is None:
            buf = _BUFFERS[k] = torch.empty_like(value)
        return buf.copy_(value)


def static_cache(model: torch.nn.Module, rows: int, length: int):
    """A key/value cache for ``rows`` rows and at least ``length`` positions, kept on the model and reset before
    reuse, so every call of a row count reads the same cache tensors (transformers makes a new one per call)."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_refusalscope_static_caches", {})  # rows -> (positions, cache)
    held, cache = caches.get(rows, (0, None))
    if cache is None or held < length:
        length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
        cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)
        caches[rows] = (length, cache)
    else:
        cache.reset()
    return cache


def generate_kwargs(mode: str, device: torch.device) -> dict:
    """The ``model.generate`` arguments of ``mode`` besides the cache: transformers' compile config. Also raises
    torch's per-process recompile limit to ``RECOMPILE_LIMIT`` (a global setting of torch._dynamo)."""
    if check_mode(mode) == "off":
        return {}
    from transformers import CompileConfig

    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    # our choice: dynamic=None, dynamo's automatic dynamic shapes: after a second shape it compiles one symbolic
    # graph for all of them; CUDA graphs are still recorded per concrete shape, which the buckets keep few
    if mode == "inductor":
        config = CompileConfig(backend="inductor", mode="reduce-overhead", dynamic=None)
    else:  # a backend without modes (the tests' aot_eager)
        config = CompileConfig(backend=mode, mode=None, dynamic=None)
    if torch.device(device).type != "cuda":
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    return {"compile_config": config}
