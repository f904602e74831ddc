"""Compiled decoder layers for the batched prefill forwards of Stage-2 scoring (issue 13).

A scoring forward runs hundreds of rows of one prompt through every layer, so its time is matmuls plus the
element-wise work between them (norms in float32, rotary embeddings, activations, residual adds), each an
unfused pass over the whole batch in eager mode. ``compiled_layers`` swaps each decoder layer's ``forward`` for one
``torch.compile``d function of the layer class (inductor fuses those passes), for the duration of a block:
- one compiled function per layer class and mode, kept for the process, so every layer, prompt and scorer reuses
  its graphs (the layer's weights are inputs of the graph, not constants);
- symbolic in the batch and sequence sizes (``dynamic=True``, no duck shaping), so shared rows' shrinking and
  growing batches and prompts of any length reuse one graph (a layer class with two kinds of layers, such as
  Gemma-2's sliding and global attention, gets one graph each; a one-row batch one more);
- hooks stay outside the compiled region: ``_call_impl`` runs them eagerly around the compiled ``forward``.
Generation is not touched (``lm.compiled`` compiles the whole decode step instead). The result is the eager one up
to float rounding (fused kernels may sum in another order), as batch shapes already change it.

Modes: as ``lm.compiled.MODES``: ``off``, ``inductor`` (fused kernels, CPU or GPU), ``aot_eager`` (the graph is
captured, nothing fused: what tests use to check captures and reuse cheaply).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from refusalscope.lm.compiled import check_mode, compile_errors, symbolic_sizes
from refusalscope.lm.hooks import decoder_layers

_COMPILED: dict[tuple[type, str], Callable] = {}


def layer_forward(layer_class: type, mode: str) -> Callable:
    """The process's compiled ``forward`` of ``layer_class`` in ``mode`` (made on first use)."""
    key = (layer_class, check_mode(mode))
    if key not in _COMPILED:
        symbolic_sizes()
        # our choice: dynamic=True, rows and length symbolic from the first graph on, as for generation
        # (lm.compiled): shared rows change the row count from layer to layer, prompts their length; inductor's
        # default mode, no CUDA graphs (a scoring forward of ~1,000 rows is not launch-bound)
        _COMPILED[key] = torch.compile(layer_class.forward, backend=mode, dynamic=True)
    return _COMPILED[key]


@contextmanager
def compiled_layers(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Inside the block, every decoder layer of ``model`` runs its class's compiled ``forward`` (``mode`` "off":
    nothing changes). A layer whose ``forward`` is already swapped (``hooks.replaying``) is left as it is. A
    failing compile is one error line naming ``--compile-scoring off``."""
    if check_mode(mode) == "off":
        yield
        return
    layers = [layer for layer in decoder_layers(model) if "forward" not in layer.__dict__]
    try:
        for layer in layers:
            layer.forward = types.MethodType(layer_forward(type(layer), mode), layer)
        with compile_errors(mode, "scoring", "--compile-scoring"):
            yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
