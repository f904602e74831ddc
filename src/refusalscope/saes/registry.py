"""SAE sets: one SAE per layer, named in a registry, given as a SAELens release, or a local directory.

Spec forms accepted by ``load_sae_set``:
- a registry name (``gemmascope-res-16k``, ``gemmascope-res-65k``, ``llamascope-res-32k``, ``llamascope-res-128k``);
- ``saelens:RELEASE:ID`` where ID contains ``{layer}`` (e.g. ``saelens:gemma-scope-2b-pt-res-canonical:
  layer_{layer}/width_16k/canonical``), or names one SAE;
- a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), or a directory of such directories (each
  subdirectory's hook name gives its layer) — which is how refusalscope stores the SAEs it trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.placement import HostHolding
from refusalscope.saes.sae import Sae
from refusalscope.saes.saelens_io import layer_from_hook_name, load_sae_dir, load_sae_pretrained


@dataclass(frozen=True)
class SaeSetEntry:
    name: str
    model: str  # registry alias of the model it was trained on
    release: str  # SAELens release
    id_template: str  # SAELens SAE id, with {layer}
    n_layers: int
    neuronpedia_template: str | None = None  # Neuronpedia source id, with {layer}
    notes: str = ""

    def sae_id(self, layer: int) -> str:
        return self.id_template.format(layer=layer)

    def neuronpedia_id(self, layer: int) -> str | None:
        return self.neuronpedia_template.format(layer=layer) if self.neuronpedia_template else None


# GemmaScope was trained on Gemma-2-2B base (not on BOS); the paper applies it to the -IT model.
# GemmaScope and LlamaScope both have apply_b_dec_to_input=False, which SAELens' configs carry.
SAE_SETS: dict[str, SaeSetEntry] = {e.name: e for e in (
    SaeSetEntry("gemmascope-res-16k", "gemma-2-2b-it", "gemma-scope-2b-pt-res-canonical",
                "layer_{layer}/width_16k/canonical", 26, "gemma-2-2b/{layer}-gemmascope-res-16k",
                "JumpReLU, 16,384 latents, every layer"),
    SaeSetEntry("gemmascope-res-65k", "gemma-2-2b-it", "gemma-scope-2b-pt-res-canonical",
                "layer_{layer}/width_65k/canonical", 26, "gemma-2-2b/{layer}-gemmascope-res-65k",
                "JumpReLU, 65,536 latents, every layer (the paper's main set)"),
    SaeSetEntry("llamascope-res-32k", "llama-3.1-8b-instruct", "llama_scope_lxr_8x", "l{layer}r_8x", 32,
                "llama3.1-8b/{layer}-llamascope-res-32k",
                "JumpReLU as SAELens converts them (trained TopK), 32,768 latents (8x), every layer"),
    SaeSetEntry("llamascope-res-128k", "llama-3.1-8b-instruct", "llama_scope_lxr_32x", "l{layer}r_32x", 32,
                "llama3.1-8b/{layer}-llamascope-res-131k",
                "JumpReLU as SAELens converts them (trained TopK), 131,072 latents (32x), every layer; 137 GB in "
                "float32, held in bfloat16 where that would take over 70% of the available memory (--sae-dtype)"),
)}
DEFAULT_SAE_SET = {"gemma-2-2b-it": "gemmascope-res-65k", "llama-3.1-8b-instruct": "llamascope-res-32k"}


def _cfg_layer(path: Path) -> int | None:
    """The layer a SAELens directory's cfg.json names by its hook (None: it does not say, or cannot be read)."""
    try:
        cfg = json.loads((path / "cfg.json").read_text())
        return layer_from_hook_name((cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name"))
    except (OSError, ValueError, AttributeError):
        return None


def _dir_set(root: Path, layers: Sequence[int] | None, dtype: str) -> dict[int, Sae]:
    if (root / "cfg.json").is_file():
        sae = HostHolding(dtype, 1)(load_sae_dir(root))
        return {sae.layer: sae}
    subdirs = sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
    if not subdirs:
        raise RefusalScopeError(f"{root} holds no SAELens SAE (no cfg.json in it or in its subdirectories)")
    if layers is not None:  # skip the other layers' directories unread when their cfg.json names the layer
        subdirs = [p for p in subdirs if _cfg_layer(p) in (*layers, None)]
    keep = HostHolding(dtype, len(subdirs))
    out: dict[int, Sae] = {}
    for p in subdirs:
        sae = load_sae_dir(p)
        if layers is not None and sae.layer not in layers:
            del sae  # before the next directory loads
            continue
        sae = keep(sae)
        if sae.layer in out:
            raise RefusalScopeError(f"{root} has two SAEs for layer {sae.layer}: {out[sae.layer].source} and {p}")
        out[sae.layer] = sae
    return out


def load_sae_set(spec: str, layers: Sequence[int] | None = None, dtype: str = "auto") -> dict[int, Sae]:
    """{layer: Sae} for ``spec`` restricted to ``layers`` (None: every layer the spec has), held in host memory in
    ``dtype`` (auto, float32 or bfloat16: ``saes.placement.choose_host_dtype``), converted layer by layer."""
    entry = SAE_SETS.get(spec)
    if entry is not None:
        wanted = range(entry.n_layers) if layers is None else layers
        bad = [layer for layer in wanted if not 0 <= layer < entry.n_layers]
        if bad:
            raise RefusalScopeError(f"SAE set {spec} covers layers 0..{entry.n_layers - 1}; asked for {bad}")
        keep = HostHolding(dtype, len(wanted))
        return {layer: keep(load_sae_pretrained(entry.release, entry.sae_id(layer), layer=layer,
                                                neuronpedia_id=entry.neuronpedia_id(layer)))
                for layer in wanted}
    if spec.startswith("saelens:"):
        try:
            _, release, sae_id = spec.split(":", 2)
        except ValueError:
            raise RefusalScopeError(f"cannot read {spec!r}; use saelens:RELEASE:ID (ID may contain {{layer}})") \
                from None
        if "{layer}" in sae_id:
            if layers is None:
                raise RefusalScopeError(f"{spec} names an SAE per layer: say which layers (--layers)")
            keep = HostHolding(dtype, len(layers))
            return {layer: keep(load_sae_pretrained(release, sae_id.format(layer=layer), layer=layer))
                    for layer in layers}
        sae = HostHolding(dtype, 1)(load_sae_pretrained(release, sae_id))
        return {sae.layer: sae}
    root = Path(spec).expanduser()
    if root.is_dir():
        out = _dir_set(root, layers, dtype)
        missing = sorted(set(layers or ()) - set(out))
        if missing:
            raise RefusalScopeError(f"{root} has no SAE for layer(s) {missing}")
        return out
    raise RefusalScopeError(f"unknown SAE set {spec!r}: not a registry name ({', '.join(SAE_SETS)}), "
                            "not saelens:RELEASE:ID and not a directory")
