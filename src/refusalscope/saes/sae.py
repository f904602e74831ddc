"""SAEs on the residual stream: a plain-tensor view of SAELens SAEs, loading, saving and exact encodes.

Every SAE here reads the residual stream *output* of one decoder layer (SAELens ``blocks.{l}.hook_resid_post``,
which equals ``blocks.{l+1}.hook_resid_pre``). We keep only the tensors the ablation formula needs, so later
stages can slice encoder columns (the fast path) and move many SAEs to a device at once. Loading and saving go
through SAELens, so a saved SAE is a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

Architectures (paper, "Sparse Autoencoders"; z = f(pre), pre = (h - b_dec·apply_b_dec_to_input) W_enc + b_enc):
- ``relu`` (SAELens "standard"): z = ReLU(pre);
- ``jumprelu`` (GemmaScope): z = ReLU(pre) · 1[pre > θ];
- ``topk`` (LlamaScope, our own): z = ReLU of the k largest pre-activations, 0 elsewhere.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from refusalscope.errors import RefusalScopeError

ARCHS = ("relu", "jumprelu", "topk")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass(frozen=True)
class Sae:
    """One residual-stream SAE at the output of decoder layer ``layer``."""

    arch: str
    W_enc: torch.Tensor  # (d_in, width)
    b_enc: torch.Tensor  # (width,)
    W_dec: torch.Tensor  # (width, d_in)
    b_dec: torch.Tensor  # (d_in,)
    layer: int
    threshold: torch.Tensor | None = None  # jumprelu
    k: int | None = None  # topk
    apply_b_dec_to_input: bool = False
    source: str = ""
    neuronpedia_id: str | None = None
    # Tokens with a larger residual norm (attention sinks) lie outside the SAE's training domain: z = 0 there.
    max_norm: float | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise RefusalScopeError(f"unsupported SAE architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        d, m = self.W_enc.shape
        if self.W_dec.shape != (m, d) or self.b_enc.shape != (m,) or self.b_dec.shape != (d,):
            raise RefusalScopeError(f"SAE {self.source or ''} has inconsistent shapes: W_enc {tuple(self.W_enc.shape)}, "
                                    f"W_dec {tuple(self.W_dec.shape)}")
        if self.arch == "jumprelu" and (self.threshold is None or self.threshold.shape != (m,)):
            raise RefusalScopeError("a jumprelu SAE needs a threshold per latent")
        if self.arch == "topk" and not (self.k and 0 < self.k <= m):
            raise RefusalScopeError(f"a topk SAE needs 0 < k <= width, got k={self.k}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def independent(self) -> bool:
        """Whether each latent depends only on its own pre-activation (so a subset can be encoded alone)."""
        return self.arch != "topk"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def to(self, device=None, dtype=None) -> "Sae":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec), b_dec=mv(self.b_dec),
                       threshold=mv(self.threshold))

    def _input(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.W_enc.dtype)
        return h - self.b_dec if self.apply_b_dec_to_input else h

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-activations of all latents, (..., width)."""
        return self._input(h) @ self.W_enc + self.b_enc

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        z = pre.relu()
        if self.arch == "jumprelu":
            z = z * (pre > threshold).to(z.dtype)
        return z

    def _domain(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.max_norm is None:
            return z
        return z * (h.float().norm(dim=-1, keepdim=True) <= self.max_norm).to(z.dtype)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Dense latent activations z, (..., width)."""
        pre = self.pre(h)
        if self.arch == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return self._domain(h, torch.zeros_like(pre).scatter_(-1, idx, vals.relu()))
        return self._domain(h, self._activate(pre, self.threshold))

    def encode_subset(self, h: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Activations of ``latents`` only, (..., len(latents)).

        JumpReLU/ReLU latents are independent, so this costs d × |S| instead of d × width. A TopK latent is
        active only if its pre-activation is among the k largest of *all* latents, so TopK needs the full encode.
        """
        if not self.independent:
            return self.encode(h).index_select(-1, latents)
        pre = self._input(h) @ self.W_enc.index_select(1, latents) + self.b_enc.index_select(0, latents)
        thr = None if self.threshold is None else self.threshold.index_select(0, latents)
        return self._domain(h, self._activate(pre, thr))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def check_latents(self, latents: Sequence[int] | torch.Tensor) -> None:
        ids = torch.as_tensor(latents, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.width):
            bad = ids[(ids < 0) | (ids >= self.width)].tolist()[:5]
            raise RefusalScopeError(f"latent index {bad} out of range for the layer-{self.layer} SAE "
                                    f"(width {self.width}: valid 0..{self.width - 1})")


# --- SAELens conversion -------------------------------------------------------------------------------------------

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
        raise RefusalScopeError(f"SAE {source} reads {hook_name!r} (the output of layer {hook_layer}), "
                                f"but it was given for layer {layer}")
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


def check_against_model(saes: dict[int, Sae], n_layers: int, d_model: int) -> None:
    """Every SAE must read a layer the model has, with the model's hidden size."""
    for layer, sae in saes.items():
        if not 0 <= layer < n_layers:
            raise RefusalScopeError(f"SAE layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
        if sae.d_in != d_model:
            raise RefusalScopeError(f"the layer-{layer} SAE ({sae.source}) has d_in {sae.d_in}, but the model's "
                                    f"hidden size is {d_model}: these SAEs belong to another model")
