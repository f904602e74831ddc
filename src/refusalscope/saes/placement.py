"""Where the stages' SAEs live: all on the model's device, or in host memory with only what a stage needs moved.

An SAE set can outgrow the GPU: LlamaScope's 131k-latent SAEs on Llama-3.1-8B's 32 layers hold 137 GB in float32
(2 × 4096 × 131,072 × 4 bytes per layer) next to a 16 GB model. The stages never need all of it at once: an
ablation needs the encoder and decoder columns of the latents it ablates (``interventions.latents`` slices them
and moves only those), and a full encode (the features active on a prompt) needs one layer's encoder at a time.
Results are the same either way: the moved columns are the float32 values the device placement would hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.sae import Sae

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
    """The SAEs for the stages, float32: on ``device``, or (host placement) in CPU memory. TopK SAEs always go to
    the device: every ablation needs their full encode."""
    where = choose_placement(saes, device, placement)
    return {layer: sae.to(device if where == "device" or not sae.independent else "cpu", torch.float32)
            for layer, sae in saes.items()}
