"""SAELens I/O: convert between SAELens SAEs and our plain-tensor ``Sae``, load (directory or pretrained release,
GemmaScope / LlamaScope through SAELens' registry) and save in SAELens format (``cfg.json`` + weights)."""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.sae import Sae

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """Residual-stream output layer named by a SAELens hook name, or None if it is not a residual hook."""
    m = _HOOK_RE.match(hook_name or "")
    if not m:
        return None
    n = int(m.group(1))
    return n if m.group(2) == "post" else n - 1


def from_saelens(sae, *, layer: int | None = None, source: str = "", neuronpedia_id: str | None = None) -> Sae:
    """Our view of a SAELens ``SAE``; checks that it reads the residual stream after ``layer``."""
    cfg = sae.cfg
    arch = cfg.architecture()
    hook_name = getattr(cfg.metadata, "hook_name", None)
    hook_layer = layer_from_hook_name(hook_name)
    if hook_name and hook_layer is None:
        raise RefusalScopeError(f"SAE {source} reads {hook_name!r}, not the residual stream "
                                "(expected blocks.<layer>.hook_resid_post)")
    if layer is None:
        if hook_layer is None:
            raise RefusalScopeError(f"SAE {source} does not name its hook point; say which layer it belongs to")
        layer = hook_layer
    elif hook_layer is not None and hook_layer != layer:
        hint = (f"; a hook_resid_pre SAE of block {hook_layer + 1} is layer {hook_layer}'s, so ask for layer "
                f"{hook_layer} with the id of block {hook_layer + 1}" if hook_name.endswith("resid_pre") else "")
        raise RefusalScopeError(f"SAE {source} reads {hook_name!r} (the output of layer {hook_layer}), "
                                f"but it was given for layer {layer}{hint}")
    if getattr(cfg, "normalize_activations", "none") not in ("none", None):
        raise RefusalScopeError(f"SAE {source} normalises its input ({cfg.normalize_activations}); fold the "
                                "normalisation into the weights first (SAELens fold_activation_norm_scaling_factor)")
    if getattr(cfg, "reshape_activations", "none") not in ("none", None):
        raise RefusalScopeError(f"SAE {source} reshapes its input; only residual-stream SAEs are supported")
    f = lambda t: t.detach().float().clone()  # noqa: E731
    W_enc, b_enc, W_dec, b_dec = f(sae.W_enc), f(sae.b_enc), f(sae.W_dec), f(sae.b_dec)
    kw: dict = {}
    if arch == "standard":
        name = "relu"
    elif arch == "jumprelu":
        name, kw["threshold"] = "jumprelu", f(sae.threshold)
    elif arch == "topk":
        name, kw["k"] = "topk", int(cfg.k)
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):  # fold the decoder norms: same top-k, same output
            norms = W_dec.norm(dim=-1).clamp(min=1e-8)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    else:
        raise RefusalScopeError(f"SAE {source} has architecture {arch!r}; supported: standard (ReLU), jumprelu, topk")
    max_norm = cfg.metadata.get("refusalscope_max_norm") if hasattr(cfg.metadata, "get") else None
    # SAELens carries its registry's Neuronpedia id in the metadata: a saelens:RELEASE:ID set gets explanations too
    neuronpedia_id = neuronpedia_id or getattr(cfg.metadata, "neuronpedia_id", None) or None
    return Sae(name, W_enc, b_enc, W_dec, b_dec, layer, apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
               source=source, neuronpedia_id=neuronpedia_id, max_norm=max_norm, **kw)


def to_saelens(sae: Sae, *, model_name: str = "", extra_metadata: dict | None = None):
    """A SAELens inference SAE with our weights (used for saving, and to check our encodes against SAELens)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    extra = dict(extra_metadata or {})
    if sae.max_norm is not None:
        extra["refusalscope_max_norm"] = sae.max_norm
    meta = SAEMetadata(hook_name=sae.hook_name, model_name=model_name, **extra)
    common = dict(d_in=sae.d_in, d_sae=sae.width, dtype="float32", device="cpu",
                  apply_b_dec_to_input=sae.apply_b_dec_to_input, metadata=meta)
    state = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.arch == "relu":
        out = StandardSAE(StandardSAEConfig(**common))
    elif sae.arch == "jumprelu":
        out = JumpReLUSAE(JumpReLUSAEConfig(**common))
        state["threshold"] = sae.threshold
    else:
        out = TopKSAE(TopKSAEConfig(k=sae.k, rescale_acts_by_decoder_norm=False, **common))
    out.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in state.items()})
    return out


def save_sae(sae: Sae, path: str | Path, *, model_name: str = "", extra_metadata: dict | None = None) -> Path:
    """Write a SAELens directory atomically (a crash leaves either the old directory or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        to_saelens(sae.to("cpu", torch.float32), model_name=model_name, extra_metadata=extra_metadata).save_model(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_sae_dir(path: str | Path, *, layer: int | None = None, neuronpedia_id: str | None = None) -> Sae:
    """Load a SAELens directory (cfg.json + sae_weights.safetensors) with a clear error if it is broken."""
    from sae_lens import SAE

    p = Path(path).expanduser()
    if not (p / "cfg.json").is_file():
        raise RefusalScopeError(f"{p} is not a SAELens SAE directory (no cfg.json)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = SAE.load_from_disk(str(p), device="cpu")
    except Exception as e:
        raise RefusalScopeError(f"the SAE in {p} could not be loaded ({type(e).__name__}: {e}); "
                                "the file may be corrupt or incomplete") from None
    return from_saelens(raw, layer=layer, source=str(p), neuronpedia_id=neuronpedia_id)


def load_sae_pretrained(release: str, sae_id: str, *, layer: int | None = None,
                        neuronpedia_id: str | None = None) -> Sae:
    """Load a SAELens release (downloaded from the hub once, then cached by huggingface_hub)."""
    from sae_lens import SAE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:
        raise RefusalScopeError(f"could not load SAE {release} / {sae_id} ({type(e).__name__}: {e}); offline and "
                                "not cached, or an unknown release/id (see sae_lens pretrained_saes.yaml)") from None
    return from_saelens(raw, layer=layer, source=f"{release}/{sae_id}", neuronpedia_id=neuronpedia_id)
