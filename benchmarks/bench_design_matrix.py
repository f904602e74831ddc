"""Stage 3's design matrix at the Gemma size: ``combine``, ``keep_columns`` and the per-feature tables, random data.

    # CPU: 1,040 prompts, layers 2..25 of 65,536 latents, 4 positions, 64 active latents per token and layer
    python benchmarks/bench_design_matrix.py --json /tmp/design.json

What ``stage3.fit_interaction_models`` does between the activation pass and the FM's training, for both position
layouts ("max" and "positions", the default "auto" trains both): the sparse matrix from the COO activations, the
columns a training row fires (plus the Stage-2 features'), the kept columns' tensors that are stored with the FM,
and what the rankings read from them (``stage3._models_from``: one embedding and one probe |w| per feature, made at
fit time and whenever a run's Stage 3 is loaded; random values here), and one prompt's FM and probe rankings. Random
activations: each position of each prompt has ``--l0`` distinct active latents per layer (spread over the width,
values |N(0, 1)|). Prints seconds per step and mode, the column counts and the process's peak RSS; one JSON object
last (also written to ``--json``)."""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from bench_common import emit


def random_coo(rows: int, layers: list[int], width: int, positions: int, l0: int, seed: int = 0) -> dict:
    """COO activations as ``encode_last_positions`` returns them (distinct latents per token and layer)."""
    rng = np.random.default_rng(seed)
    shape = (rows, positions, len(layers), l0)
    # distinct within a token: a random start, then every (width // l0)-th latent, each shifted by less than that
    stride = width // l0
    start = rng.integers(0, width, size=shape[:3] + (1,))
    latent = (start + np.arange(l0) * stride + rng.integers(0, stride, size=shape)) % width
    row = np.broadcast_to(np.arange(rows)[:, None, None, None], shape).ravel()
    pos = np.broadcast_to((np.arange(positions) - positions)[None, :, None, None], shape).ravel()
    layer = np.broadcast_to(np.asarray(layers)[None, None, :, None], shape).ravel()
    value = np.abs(rng.standard_normal(row.shape[0])).astype(np.float32) + 1e-3
    return {"row": torch.from_numpy(row.astype(np.int32)), "position": torch.from_numpy(pos.astype(np.int32)),
            "layer": torch.from_numpy(layer.astype(np.int32)), "latent": torch.from_numpy(latent.ravel()
                                                                                          .astype(np.int32)),
            "value": torch.from_numpy(value)}


def main(argv=None) -> dict:
    from refusalscope.saes.features import Feature
    from refusalscope.stages import interaction_data as idata
    from refusalscope.stages.stage3 import _columns_tensors, _models_from, rank_by_fm, rank_by_probe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1040)
    ap.add_argument("--layers", default="2-25", help="SAE layers, 'A-B' (Gemma-2-2B: 2..l*)")
    ap.add_argument("--width", type=int, default=65536)
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=20000, help="a prompt's Stage-3 candidates for the rankings")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    coo = random_coo(args.rows, layers, args.width, args.positions, args.l0)
    widths = {ly: args.width for ly in layers}
    train = np.arange(args.rows) % 10 < 8
    always = [Feature(layers[-1], j) for j in range(20)]  # a Stage-2 set's worth of always-kept features
    out: dict = {"rows": args.rows, "layers": args.layers, "width": args.width, "positions": args.positions,
                 "l0": args.l0, "entries": int(len(coo["row"])), "threads": torch.get_num_threads(), "modes": {}}
    for mode in ("max", "positions"):
        t0 = time.perf_counter()
        X, columns = idata.combine(coo, args.rows, layers, widths, mode=mode, n_positions=args.positions)
        t1 = time.perf_counter()
        Xk, kept, report = idata.keep_columns(X, columns, train, always)
        t2 = time.perf_counter()
        tensors = _columns_tensors(kept)
        t3 = time.perf_counter()
        # what the rankings read (one embedding and one |w| per feature), from the stored tensors
        g = torch.Generator().manual_seed(1)
        fm_t = {"V": torch.randn(len(kept), 20, generator=g), **tensors}
        probe_t = {"w": torch.randn(len(kept), generator=g), **tensors}
        models = _models_from(fm_t, probe_t, {"mode": mode})
        t4 = time.perf_counter()
        # one prompt's rankings: --candidates of the table's features (and as many it lacks), 15 anchors
        feats = list(models.embeddings)
        pick = torch.randperm(len(feats), generator=g)[:args.candidates].tolist()
        cands = sorted({feats[i] for i in pick} | {Feature(layers[-1] + 1, j) for j in range(len(pick))})
        t5 = time.perf_counter()
        rank_by_fm(cands, cands[:15], models.embeddings)
        rank_by_probe(cands, models.probe_weights)
        t6 = time.perf_counter()
        out["modes"][mode] = {"combine_s": round(t1 - t0, 2), "keep_columns_s": round(t2 - t1, 2),
                              "column_tensors_s": round(t3 - t2, 2), "models_s": round(t4 - t3, 2),
                              "total_s": round(t4 - t0, 2), "rank_one_prompt_s": round(t6 - t5, 3),
                              "candidates": len(cands), "features": len(models.embeddings),
                              "columns": int(X.shape[1]), "kept": len(kept), "nnz": int(X.nnz),
                              "kept_digest": int(sum(int(t.long().sum()) * (i + 1) for i, t in
                                                     enumerate(tensors.values())))}
        print(f"{mode}: combine {t1 - t0:.2f} s, keep_columns {t2 - t1:.2f} s, column tensors {t3 - t2:.2f} s, "
              f"embeddings and weights per feature {t4 - t3:.2f} s, one prompt's FM and probe rankings of "
              f"{len(cands):,} candidates {t6 - t5:.3f} s; {len(kept):,} of {X.shape[1]:,} columns kept", flush=True)
        del X, Xk, columns, kept
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
