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

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from refusalscope.errors import RefusalScopeError

CompileMode = Literal["off", "inductor", "aot_eager"]
MODES: tuple[str, ...] = get_args(CompileMode)
CompileSetting = Literal["auto", "off", "inductor", "aot_eager"]  # what a run is told (``enough_prompts``,
# then ``choose_mode`` resolve it)
# our choice: "auto" compiles for runs of at least this many prompts, on a GPU only. On an H200 compiling cost
# ~225 s once per process and a warm worst-case prompt took 5.8-8.3 s against 14.8 s eager: break-even after 25-35
# prompts; real sweeps stop early and save less, hence 64. On 2 CPU cores it saved nothing (benchmarks/RESULTS.md)
AUTO_MIN_PROMPTS = 64
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


def enough_prompts(setting: str, n_prompts: int, min_prompts: int = AUTO_MIN_PROMPTS) -> str:
    """``setting``, with "auto" turned "off" when a process generates for fewer than ``min_prompts`` prompts (too
    few to pay the compile back). A run applies it once (``pipeline.steps.compile_setting``)."""
    return "off" if setting == "auto" and n_prompts < min_prompts else setting


def choose_mode(setting: str, device: torch.device | str, saes: Mapping | None = None) -> str:
    """The compile mode generation on ``device`` with ``saes`` uses: ``setting`` itself, or for "auto",
    ``inductor`` on a GPU unless an SAE's latents are not independent (TopK), else ``off``."""
    if setting != "auto":
        return check_mode(setting)
    # our choice: TopK SAEs stay eager under auto: a padded hook sits at every SAE layer and a TopK latent needs the
    # full encode, so every decode step would read every layer's whole encoder (host-held ones over the bus)
    independent = all(sae.independent for sae in (saes or {}).values())
    return "inductor" if torch.device(device).type == "cuda" and independent else "off"


def bucket(n: int, least: int = 1) -> int:
    """The next power of two ≥ max(n, least): the sizes compiled shapes are rounded up to (our choice: powers of
    two, so a handful of shapes cover every size at less than twice the work)."""
    n = max(int(n), int(least), 1)
    return 1 << (n - 1).bit_length()


def padded_rows(rows: Sequence[int], cap: int | None = None) -> list[int]:
    """``rows`` with its last index repeated up to a power-of-two count, but not past ``cap`` rows (the batch
    size: padding must not make a batch larger than the user allowed); the repeats' outputs are dropped."""
    rows = list(rows)
    # at least 2 rows: torch compiles a size of 1 as a special case, one more graph for single-row calls
    target = bucket(len(rows), least=2) if rows else 0
    target = target if cap is None else min(target, max(cap, len(rows)))
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


def release(model: torch.nn.Module | None = None) -> None:
    """Free the key/value caches kept on ``model`` (if given) and this process's hook buffers; later compiled calls
    make them anew (and CUDA graphs re-record). Compiled graphs and CUDA-graph pools stay: torch._dynamo.reset()."""
    if model is not None:
        model.__dict__.pop("_refusalscope_static_caches", None)
    _BUFFERS.clear()


@contextmanager
def compile_errors(mode: str, what: str = "generation", flag: str = "--compile-generation"):
    """A failure of torch.compile inside the block (``what`` is compiled) as one clear error naming the way out,
    ``flag`` off (finished prompts are kept, so rerunning with compilation off loses nothing)."""
    import torch._dynamo.exc

    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as err:
        if mode == "off":
            raise
        cause = getattr(err, "inner_exception", None) or err  # a compiler's own error, wrapped by dynamo
        first = (str(cause).strip().splitlines() or [""])[0]
        raise RefusalScopeError(f"compiled {what} ({mode}) failed: {type(cause).__name__}: {first[:300]}; rerun "
                                f"with {flag} off") from err


def symbolic_sizes() -> None:
    """The process-wide torch settings every compile here needs: the recompile limit raised to ``RECOMPILE_LIMIT``,
    and no duck shaping (it gives equal sizes one symbol: a first call whose row count equals a head count of the
    key/value cache would tie the two, and the next row count would compile a second graph)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    fx_config.use_duck_shape = False


def generate_kwargs(mode: str, device: torch.device) -> dict:
    """The ``model.generate`` arguments of ``mode`` besides the cache: transformers' compile config. Also sets the
    process-wide ``symbolic_sizes``."""
    if check_mode(mode) == "off":
        return {}
    from transformers import CompileConfig

    symbolic_sizes()
    # our choice: dynamic=True, every bucketed size its own symbol from the first graph on (with no duck shaping and
    # at least 2 rows): one compiled graph per process where dynamo's default (a static graph, then a recompile
    # per kind of size that changes) made 4 (CPU toy, RESULTS.md). CUDA graphs are still recorded per concrete
    # shape, which the buckets keep few
    if mode == "inductor":
        config = CompileConfig(backend="inductor", mode="reduce-overhead", dynamic=True)
    else:  # a backend without modes (the tests' aot_eager)
        config = CompileConfig(backend=mode, mode=None, dynamic=True)
    if torch.device(device).type != "cuda":
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    return {"compile_config": config}
