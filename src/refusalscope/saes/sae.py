"""SAEs on the residual stream: a plain-tensor view of SAELens SAEs, loading, saving and exact encodes.

Every SAE here reads the residual stream *output* of one decoder layer (SAELens ``blocks.{l}.hook_resid_post``,
which equals ``blocks.{l+1}.hook_resid_pre``). We keep only the tensors the ablation formula needs, so later
stages can slice encoder columns (the fast path) and move many SAEs to a device at once. Loading and saving go
through SAELens, so a saved SAE is a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

Architectures (paper, "Sparse Autoencoders"; z = f(pre), pre = (h - b_dec·apply_b_dec_to_input) W_enc + b_enc):
- ``relu`` (SAELens "standard"): z = ReLU(pre);
- ``jumprelu`` (GemmaScope): z = ReLU(pre) · 1[pre > θ];
- ``topk`` (our own; LlamaScope was trained so, but SAELens loads it as JumpReLU): z = ReLU of the k largest
  pre-activations, 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from refusalscope.errors import RefusalScopeError

ARCHS = ("relu", "jumprelu", "topk")


def moved(t: torch.Tensor | None, device=None, dtype=None) -> torch.Tensor | None:
    """``t.to(device, dtype)`` with the same values, crossing devices in the narrower of the two dtypes: a
    bfloat16-held weight goes to the GPU as bfloat16 and is widened there, and a float32 one on the GPU is narrowed
    there before it comes to the host (a blocking ``to`` converts on the host either way, so it moves float32 bytes;
    widening on the GPU holds both copies there for a moment instead)."""
    if t is None:
        return None
    if device is None or dtype is None or torch.device(device) == t.device or dtype == t.dtype:
        return t.to(device=device, dtype=dtype)
    if dtype.itemsize > t.element_size():
        return t.to(device).to(dtype)  # widening: move, then convert
    return t.to(dtype).to(device)  # narrowing (or the same size): convert, then move


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
            raise RefusalScopeError(f"SAE {self.source or ''} has inconsistent shapes: "
                                    f"W_enc {tuple(self.W_enc.shape)}, "
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
        def mv(t):
            return moved(t, device, dtype)

        return replace(self, W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec), b_dec=mv(self.b_dec),
                       threshold=mv(self.threshold))

    def ready_on(self, device: torch.device | str) -> bool:
        """Whether the SAE can compute on ``device`` as it is: held there, in float32 (a set too large for memory
        in float32 is held in bfloat16, ``saes.placement.HOST_DTYPES``, and its columns converted when used)."""
        return self.W_enc.device == torch.device(device) and self.W_enc.dtype == torch.float32

    def on(self, device: torch.device | str) -> "Sae":
        """The SAE in float32 on ``device`` (itself when ``ready_on``): the whole SAE, for reference forms."""
        return self if self.ready_on(device) else self.to(device, torch.float32)

    # SAE arithmetic is float32 whatever dtype the weights are held in: ``.float()`` is free for float32 weights,
    # and converts a bfloat16-held SAE's values exactly

    def _input(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h - self.b_dec.float() if self.apply_b_dec_to_input else h

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-activations of all latents, (..., width)."""
        return self._input(h) @ self.W_enc.float() + self.b_enc.float()

    def _activate(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        z = pre.relu()
        if self.arch == "jumprelu":
            z = z * (pre > threshold.float()).to(z.dtype)
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
            # the full encode, with the code read at ``latents`` before the domain mask is applied: the values of
            # encode(h)[..., latents], without masking a dense (..., width) tensor
            vals, idx = self.pre(h).topk(self.k, dim=-1, sorted=False)
            latents = latents.to(idx.device)
            if self.k * len(latents) <= self.width:  # few latents: match them against the k winners
                hit = idx.unsqueeze(-1) == latents  # (..., k, |S|): each latent is among the winners at most once
                z = torch.where(hit, vals.relu().unsqueeze(-1), 0.0).sum(-2)  # not a product: inf * 0 is NaN
            else:
                z = torch.zeros_like(vals[..., :1]).expand(*vals.shape[:-1], self.width).contiguous()
                z = z.scatter_(-1, idx, vals.relu()).index_select(-1, latents)
            return self._domain(h, z)
        pre = self._input(h) @ self.W_enc.index_select(1, latents).float() + self.b_enc.index_select(0, latents).float()
        thr = None if self.threshold is None else self.threshold.index_select(0, latents)
        return self._domain(h, self._activate(pre, thr))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() @ self.W_dec.float() + self.b_dec.float()

    def check_latents(self, latents: Sequence[int] | torch.Tensor) -> None:
        ids = torch.as_tensor(latents, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.width):
            bad = ids[(ids < 0) | (ids >= self.width)].tolist()[:5]
            raise RefusalScopeError(f"latent index {bad} out of range for the layer-{self.layer} SAE "
                                    f"(width {self.width}: valid 0..{self.width - 1})")


# --- SAELens conversion -------------------------------------------------------------------------------------------

def check_against_model(saes: dict[int, Sae], n_layers: int, d_model: int) -> None:
    """Every SAE must read a layer the model has, with the model's hidden size."""
    for layer, sae in saes.items():
        if not 0 <= layer < n_layers:
            raise RefusalScopeError(f"SAE layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
        if sae.d_in != d_model:
            raise RefusalScopeError(f"the layer-{layer} SAE ({sae.source}) has d_in {sae.d_in}, but the model's "
                                    f"hidden size is {d_model}: these SAEs belong to another model")
