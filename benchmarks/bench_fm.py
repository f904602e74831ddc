"""Time Stage 3's factorization-machine training (``refusalscope.stages.fm.train_fm``) at the Gemma size.

    # CPU, one row per prompt (max over the positions), 16 layers x 65,536 GemmaScope latents = 1,048,576 columns
    python benchmarks/bench_fm.py --mode max --json /tmp/fm_max.json
    # GPU, every position its own column block (4 x 1,048,576 columns)
    python benchmarks/bench_fm.py --mode positions --device cuda --json /tmp/fm_positions.json

Random activations with GemmaScope-like sparsity: each of ``--positions`` tokens of a prompt has ``--l0`` active
latents per layer (uniform over the layer's ``--columns / --layers`` latents, values |N(0, 1)| x 10). ``max``: one
row over ``--columns`` columns holding the max over the positions (nnz ≈ the union); ``positions``: position p
fills its own block of ``--columns`` columns. Labels are random and balanced, so the accuracies are chance: this
times training, tests/stages/test_fm.py checks what it learns. 80/10/10 split. On CUDA one untimed epoch first
(kernel loading, allocator). Prints one JSON object (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp
import torch

from bench_common import emit, sync


def random_activations(rows: int, columns: int, layers: int, positions: int, l0: int, mode: str,
                       value_scale: float = 10.0, seed: int = 0):
    """(X csr (rows, columns or positions x columns), y) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    width = columns // layers
    latent = rng.integers(0, width, size=(rows, positions, layers, l0))
    col = latent + (np.arange(layers) * width)[None, None, :, None]
    if mode == "positions":
        col = col + (np.arange(positions) * columns)[None, :, None, None]
    n_cols = columns * positions if mode == "positions" else columns
    row = np.broadcast_to(np.arange(rows)[:, None, None, None], col.shape).ravel()
    col = col.ravel()
    val = (np.abs(rng.standard_normal(col.shape[0])) * value_scale).astype(np.float32)
    y = rng.permutation(np.arange(rows) % 2)
    # duplicates (a latent active at several positions, in max mode): keep the max, as the pipeline's max-pooling
    key = row.astype(np.int64) * n_cols + col
    order = np.lexsort((-val, key))
    key, val = key[order], val[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, val = key[first], val[first]
    X = sp.csr_matrix((val, (key // n_cols, key % n_cols)), shape=(rows, n_cols))
    return X, y


def main(argv: list[str] | None = None) -> dict:
    from refusalscope.stages.fm import FmConfig, evaluate_fm, train_fm

    ap = argparse.ArgumentParser()
    ap.add_argument("--columns", type=int, default=1_048_576, help="latents over all layers (per position)")
    ap.add_argument("--rows", type=int, default=1040, help="prompts (harmful + harmless)")
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--mode", choices=["max", "positions"], default="max")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--l0", type=int, default=70, help="active latents per token per layer")
    ap.add_argument("--value-scale", type=float, default=10.0, help="activations are |N(0, 1)| x this")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-std", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--probe", action="store_true", help="also time the linear-probe baseline (CPU, scikit-learn)")
    ap.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    X, y = random_activations(args.rows, args.columns, args.layers, args.positions, args.l0, args.mode,
                              args.value_scale)
    t_data = time.perf_counter() - t0
    perm = np.random.default_rng(1).permutation(args.rows)
    n_tr, n_va = int(0.8 * args.rows), int(0.1 * args.rows)
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]

    if device.type == "cuda":  # CUDA context, kernel loading and the allocator's first blocks: outside the timing
        warm = FmConfig(k=args.k, epochs=1, batch_size=args.batch_size, device=args.device)
        train_fm(X[tr], y[tr], X[va], y[va], warm, progress=False)
        torch.cuda.reset_peak_memory_stats(device)
    cfg = FmConfig(k=args.k, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                   init_std=args.init_std, weight_decay=args.weight_decay)
    sync(device)
    t0 = time.perf_counter()
    fit = train_fm(X[tr], y[tr], X[va], y[va], cfg, progress=False)
    sync(device)
    t_total = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    test = evaluate_fm(fit.model, X[te], y[te], device=args.device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "mode": args.mode,
           "columns": X.shape[1], "rows": args.rows, "nnz": int(X.nnz), "nnz_per_row": round(X.nnz / args.rows, 1),
           "k": args.k, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "init_std": args.init_std,
           "weight_decay": args.weight_decay, "value_scale": args.value_scale, "seconds_data": round(t_data, 2),
           "seconds_total": round(t_total, 2), "seconds_per_epoch": round(t_total / max(args.epochs, 1), 3),
           "peak_memory_mb": round(peak_mb, 1), "best_epoch": fit.best_epoch,
           "train_loss_first_epoch": round(fit.history[0]["train_loss"], 4) if fit.history else None,
           "val_accuracy": round(fit.val_accuracy, 4), "test_accuracy": round(test["accuracy"], 4)}
    if args.probe:
        from refusalscope.stages.probe import evaluate_probe, train_probe

        t0 = time.perf_counter()
        pfit = train_probe(X[tr], y[tr], X[va], y[va])
        out.update(probe_seconds=round(time.perf_counter() - t0, 2), probe_C=pfit.C,
                   probe_test_accuracy=round(evaluate_probe(pfit, X[te], y[te])["accuracy"], 4))
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
