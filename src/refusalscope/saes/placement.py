"""Where the stages' SAEs live: all on the model's device, or in host memory with only what a stage needs moved.

An SAE set can outgrow the GPU: LlamaScope's 131k-latent SAEs on Llama-3.1-8B's 32 layers hold 137 GB in float32
(2 × 4096 × 131,072 × 4 bytes per layer) next to a 16 GB model. The stages never need all of it at once: an
ablation needs the encoder and decoder columns of the latents it ablates (``interventions.latents`` slices them
and moves only those), and a full encode (the features active on a prompt) needs one layer's encoder at a time.
Results are the same either way: the moved columns are the float32 values the device placement would hold.

The same 137 GB also outgrows most hosts (the GPU machines here have 128 GB). So the set is held in host memory in
the dtype ``choose_host_dtype`` picks as it loads, one layer at a time: float32 when it fits, else bfloat16 (half the
bytes; the stored values rounded once, then every column a stage uses converted back to float32, so all SAE
arithmetic stays float32). bfloat16 holding is the one choice here that changes results, so ``auto`` takes it only
when float32 would take over ``AUTO_HOST_SHARE`` of the available memory (or would not load at all), and says so
in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.sae import Sae, moved

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "host")
# our choice: "auto" keeps the SAEs on the GPU when they take at most this share of its free memory, leaving the
# rest for activations, key/value caches and generation (Stage 2 scores ~1,000 sets per forward on a GPU)
AUTO_SHARE = 0.6


def sae_bytes(saes: Mapping[int, Sae], dtype: torch.dtype = torch.float32) -> int:
    """Bytes the SAEs take in ``dtype`` (encoder, decoder, biases and thresholds)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum((2 * s.d_in * s.width + s.width * (1 + (s.threshold is not None)) + s.d_in) * size
               for s in saes.values())


def choose_placement(saes: Mapping[int, Sae], device: torch.device | str, placement: str = "auto") -> str:
    """"device" or "host" for ``placement`` ("auto": host only on a GPU whose free memory the SAEs would crowd)."""
    if placement not in PLACEMENTS:
        raise RefusalScopeError(f"unknown SAE placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    device = torch.device(device)
    if device.type != "cuda" or placement == "device":
        return "device"
    if placement == "host":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if sae_bytes(saes) <= AUTO_SHARE * free else "host"


def place_saes(saes: Mapping[int, Sae], device: torch.device | str, placement: str = "auto") -> dict[int, Sae]:
    """The SAEs for the stages: float32 on a GPU ``device``, or (host placement, and every CPU run) in CPU memory
    in the dtype they were loaded in (``load_sae_set``'s ``dtype``). TopK SAEs always go to the device in float32:
    every ablation needs their full encode."""
    where = choose_placement(saes, device, placement)
    device = torch.device(device)
    out = {}
    for layer, sae in saes.items():
        if not sae.independent or (where == "device" and device.type != "cpu"):
            out[layer] = sae.to(device, torch.float32)
        else:  # CPU memory: on a CPU run that is the device, and the set was held in the dtype that fits it
            out[layer] = sae.to("cpu")
    return out


# --- the dtype the set is held in on the host ----------------------------------------------------------------------

HOST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# our choice: "auto" holds the set in float32 unless it would take more than this share of the host memory that is
# available when the first layer has loaded (the rest: the model, activations, the FM's data)
AUTO_HOST_SHARE = 0.7


def available_memory() -> int:
    """Bytes of host memory available for new allocations (Linux: MemAvailable, which counts reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no way to tell: assume it fits
        return 1 << 62


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_host_dtype(setting: str, layer_bytes: int, n_layers: int, available: int) -> torch.dtype:
    """The dtype to hold an ``n_layers`` set in, each layer ``layer_bytes`` in float32, with ``available`` bytes of
    host memory (counted while one float32 layer is loaded). Raises a one-line error when it cannot fit."""
    if setting not in ("auto", *HOST_DTYPES):
        raise RefusalScopeError(f"unknown SAE dtype {setting!r}; choose auto, {', '.join(HOST_DTYPES)}")
    need32 = layer_bytes * n_layers
    room = available + layer_bytes  # the loaded layer's float32 copy is freed once it is held
    if setting == "auto":
        dtype = torch.float32 if need32 <= AUTO_HOST_SHARE * room else torch.bfloat16
    else:
        dtype = HOST_DTYPES[setting]
    # loading peaks at the last layer: the layers held before it and two float32 copies of it (SAELens' read and
    # ours; measured, benchmarks/RESULTS.md); holding it afterwards takes no more
    def peak(d: torch.dtype) -> int:
        return (n_layers - 1) * (layer_bytes if d == torch.float32 else layer_bytes // 2) + 2 * layer_bytes

    if setting == "auto" and peak(dtype) > room:
        dtype = torch.bfloat16
    if peak(dtype) > room:
        hint = "" if dtype == torch.bfloat16 else " (bfloat16 holding, run --sae-dtype bfloat16, takes about half)"
        raise RefusalScopeError(f"the SAE set needs {_gb(peak(dtype))} of host memory to load in {str(dtype)[6:]} "
                                f"({n_layers} layers of {_gb(layer_bytes)} in float32; loading holds two float32 "
                                f"copies of a layer) but {_gb(room)} is available: load fewer layers (--layers){hint}")
    if dtype != torch.float32 and setting == "auto":  # asked for, it needs no warning
        log.warning("the SAE set (%s in float32) is held in bfloat16 on the host (%s available): its weights are "
                    "rounded to bfloat16, SAE arithmetic stays float32 (--sae-dtype float32 to refuse)",
                    _gb(need32), _gb(room))
    return dtype


def held_dtype(saes: Mapping[int, Sae]) -> str:
    """The ``--sae-dtype`` a loaded set is held in ("float32" or "bfloat16")."""
    dtype = next(iter(saes.values())).W_enc.dtype
    return next(name for name, d in HOST_DTYPES.items() if d == dtype)


def hold(sae: Sae, dtype: torch.dtype) -> Sae:
    """``sae`` in host memory with its encoder and decoder matrices in ``dtype`` (biases and thresholds, a width's
    worth of numbers each, stay float32)."""
    cpu = lambda t: None if t is None else t.to("cpu")  # noqa: E731 (the matrices are not copied in float32 first)
    return replace(sae, W_enc=moved(sae.W_enc, "cpu", dtype), W_dec=moved(sae.W_dec, "cpu", dtype),
                   b_enc=cpu(sae.b_enc), b_dec=cpu(sae.b_dec), threshold=cpu(sae.threshold))


class HostHolding:
    """Holds each SAE of a set in the host dtype as it loads (``hold``), so loading peaks at the layers held so far
    plus two float32 copies of the one loading. The dtype is chosen at the first layer (``choose_host_dtype``), from
    its size and the memory left."""

    def __init__(self, setting: str, n_layers: int):
        self.setting, self.n_layers = setting, n_layers
        self.dtype: torch.dtype | None = None

    def __call__(self, sae: Sae) -> Sae:
        if self.dtype is None:
            self.dtype = choose_host_dtype(self.setting, sae_bytes({0: sae}), self.n_layers, available_memory())
        return sae if sae.W_enc.dtype == self.dtype else hold(sae, self.dtype)
