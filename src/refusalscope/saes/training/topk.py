"""A small TopK SAE trainer (Gao et al. 2024) on an in-memory activation tensor; the result is a plain ``Sae``.

Why our own: SAELens' trainer is built around its activation store and a TransformerLens model; here the
activations of all layers come from one pass of a Hugging Face model and fit in memory, so a 100-line loop is
simpler and lets us decode sparsely (``embedding_bag`` over the k active rows), which is what makes CPU training
fast enough. The saved SAE is a SAELens TopK SAE (see ``sae.save_sae``).

Inputs are rescaled so that E‖x‖² = d_in during training; the scale is folded back into the weights afterwards,
so the saved SAE reads raw residual activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refusalscope.saes.sae import Sae, moved


@dataclass
class TrainConfig:
    width: int = 4096
    k: int = 64
    epochs: int = 6
    batch_size: int = 1024
    lr: float = 1e-3
    aux_k: int = 256  # AuxK: dead latents reconstruct the residual (keeps latents alive)
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 20_000  # a latent silent for this many tokens counts as dead
    seed: int = 0


def _decode_sparse(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


def train_topk(x: torch.Tensor, layer: int, cfg: TrainConfig, *, device: str | torch.device = "cpu",
               on_step: Callable[[int, int, float], None] | None = None) -> tuple[Sae, dict]:
    """Train one TopK SAE on activations ``x`` (N, d); returns the SAE (raw-activation scale) and a log."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d = x.shape
    m, k = cfg.width, min(cfg.k, cfg.width)
    sample = x[torch.randperm(n, generator=gen)[:8192]].float()
    scale = math.sqrt(d / sample.pow(2).sum(-1).mean().item())
    W_dec = torch.randn(m, d, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    params = {
        "W_enc": W_dec.t().clone().to(device).requires_grad_(),
        "b_enc": torch.zeros(m, device=device, requires_grad=True),
        "W_dec": W_dec.to(device).requires_grad_(),
        "b_dec": (sample.median(dim=0).values * scale).to(device).requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50, 5 * (1 - s / total) + 1e-3))
    last_fired = torch.zeros(m, dtype=torch.long, device=device)
    seen, step, log = 0, 0, []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            xb = moved(x[order[s * cfg.batch_size:(s + 1) * cfg.batch_size]], device, torch.float32) * scale
            pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            vals = vals.relu()
            recon = _decode_sparse(vals, idx, params["W_dec"]) + params["b_dec"]
            err = xb - recon
            mse = err.pow(2).sum(-1).mean()
            loss = mse / d
            seen += xb.shape[0]
            fired = torch.zeros(m, dtype=torch.bool, device=device)
            fired[idx[vals > 0]] = True
            last_fired[fired] = seen
            dead = (seen - last_fired) > cfg.dead_after_tokens
            n_dead = int(dead.sum())
            if n_dead and cfg.aux_coeff > 0:
                ka = min(cfg.aux_k, n_dead)
                aux_pre = pre.masked_fill(~dead, float("-inf"))
                avals, aidx = aux_pre.topk(ka, dim=-1, sorted=False)
                aux = _decode_sparse(avals.relu(), aidx, params["W_dec"])
                resid = err.detach()
                aux_loss = (resid - aux).pow(2).sum(-1).mean() / resid.pow(2).sum(-1).mean().clamp(min=1e-8)
                loss = loss + cfg.aux_coeff * aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # unit decoder rows: the scale lives in the latents
                params["W_dec"].div_(params["W_dec"].norm(dim=-1, keepdim=True).clamp(min=1e-8))
            step += 1
            if step % 20 == 0 or step == total:
                fvu = (mse / (xb - xb.mean(0)).pow(2).sum(-1).mean()).item()
                log.append({"step": step, "fvu": fvu, "dead": n_dead})
                if on_step:
                    on_step(step, total, fvu)
    with torch.no_grad():  # fold the input scale back: the SAE reads raw activations
        p = {k_: v.detach().float().cpu() for k_, v in params.items()}
        sae = Sae("topk", p["W_enc"] * scale, p["b_enc"], p["W_dec"] / scale, p["b_dec"] / scale, layer, k=k,
                  apply_b_dec_to_input=True)
    return sae, {"steps": total, "scale": scale, "trace": log}
