"""Forward hooks on the decoder layers of Hugging Face causal LMs (Qwen2, Llama, Gemma-2 and alike).

Hook points, in residual-stream terms:
- ``resid_pre``  (input of decoder layer l),
- ``resid_post`` (output of decoder layer l = resid_pre of l+1),
- ``attn_out`` / ``mlp_out`` (what the attention and MLP blocks add to the residual stream).
Every hook is removed when the ``hooked`` context exits, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from refusalscope.errors import RefusalScopeError

Edit = Callable[[torch.Tensor], torch.Tensor | None]  # (B, T, d) -> edited tensor, or None to leave it
POINTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


_ATTENTION_MASK: ContextVar[torch.Tensor | None] = ContextVar("refusalscope_attention_mask", default=None)


@contextmanager
def batch_context(attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Make the current batch's attention mask visible to hooks (e.g. to find each row's first real token)."""
    token = _ATTENTION_MASK.set(attention_mask)
    try:
        yield
    finally:
        _ATTENTION_MASK.reset(token)


def current_attention_mask() -> torch.Tensor | None:
    return _ATTENTION_MASK.get()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks; raises for architectures we do not know how to hook."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise RefusalScopeError(f"don't know where the decoder layers of {type(model).__name__} are")


def residual_writers(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(attention writer, MLP writer): the modules whose outputs are added to the residual stream.

    Gemma-2/3 normalise each block's output before the residual add, so the writers are those norms.
    """
    if hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None) or getattr(layer, "attention", None)
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    if attn is None or mlp is None:
        raise RefusalScopeError(f"don't know the attention/MLP modules of {type(layer).__name__}")
    return attn, mlp


@dataclass(frozen=True)
class Hook:
    point: str
    layer: int
    edit: Edit


def _apply_to_output(edit: Edit):
    def hook(module, args, output):
        if isinstance(output, tuple):
            new = edit(output[0])
            return output if new is None else (new, *output[1:])
        new = edit(output)
        return output if new is None else new

    return hook


def _apply_to_input(edit: Edit):
    def hook(module, args, kwargs):
        if args:
            new = edit(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = edit(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


@contextmanager
def hooked(model: torch.nn.Module, hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the duration of the block. Several hooks on one point run in the given order."""
    layers = decoder_layers(model)
    handles = []
    try:
        for h in hooks:
            if not 0 <= h.layer < len(layers):
                raise RefusalScopeError(f"layer {h.layer} is out of range: the model has layers 0..{len(layers) - 1}")
            layer = layers[h.layer]
            if h.point == "resid_pre":
                handles.append(layer.register_forward_pre_hook(_apply_to_input(h.edit), with_kwargs=True))
            elif h.point == "resid_post":
                handles.append(layer.register_forward_hook(_apply_to_output(h.edit)))
            elif h.point in ("attn_out", "mlp_out"):
                writer = residual_writers(layer)[0 if h.point == "attn_out" else 1]
                handles.append(writer.register_forward_hook(_apply_to_output(h.edit)))
            else:
                raise RefusalScopeError(f"unknown hook point {h.point!r}; choose one of {POINTS}")
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a recording hook once the layers it needs have run: later layers are skipped."""


def _tile(output, rows: int):
    if isinstance(output, tuple):
        return (_tile(output[0], rows), *output[1:])
    return output.expand(rows, *output.shape[1:]).contiguous()


def layer_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> dict[int, object]:
    """The outputs of decoder layers 0..n-1 on ``batch`` (one forward, stopped after layer n-1)."""
    layers = decoder_layers(model)
    outs: dict[int, object] = {}
    if n <= 0:
        return outs

    def keep(i):
        def hook(module, args, output):
            outs[i] = output
            if i == n - 1:
                raise StopForward
        return hook

    handles = [layers[i].register_forward_hook(keep(i)) for i in range(n)]
    try:
        with torch.inference_mode():
            model(**batch, logits_to_keep=1, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return outs


@contextmanager
def replaying(model: torch.nn.Module, outs: dict[int, object]) -> Iterator[None]:
    """Inside the block, decoder layers 0..len(outs)-1 return ``outs`` (from ``layer_outputs``), tiled to the
    batch size, instead of computing."""
    layers = decoder_layers(model)
    n = len(outs)

    def replay(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return _tile(outs[i], hidden.shape[0])
        return forward

    try:
        for i in range(n):
            layers[i].forward = replay(i)
        yield
    finally:
        for i in range(n):
            layers[i].__dict__.pop("forward", None)


@contextmanager
def replayed_layers(model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> Iterator[None]:
    """Inside the block, decoder layers 0..n-1 return their outputs on ``batch`` (one row), tiled to the batch
    size, instead of computing. Exact when every row is that sequence and nothing edits those layers: then
    their outputs are the same for every row (the batched stages ablate only at layers >= n).

    The layer's ``forward`` is swapped, not the module, so architectures that read attributes of their layers
    in the loop (Gemma-2's ``attention_type``) and hooks on those layers keep working.
    """
    with replaying(model, layer_outputs(model, batch, n)):
        yield
