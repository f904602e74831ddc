"""The refusal-direction step with the template prefix run once per batch (``--share-prefix``, the default) against
the plain left-padded forward (issue 13: the README's main job on a fresh machine).

    python benchmarks/bench_direction_prefix.py --data-dir ../shared/data

Runs ``compute_direction`` (the whole step of ``refusalscope direction``, default options) once per way, plain
first, in one process, and reports seconds for its three parts (mean activations of the training prompts, scoring
every candidate layer, held-out ASR of the best few: the only part that generates, plainly both ways), whether
both ways choose the same l* and position, and how far the candidate scores and the chosen direction move.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import emit

PARTS = {"collect_residuals": "mean_activations", "score_candidates": "scoring", "select": "held_out_asr"}


def timed(module, seconds: dict[str, float]):
    """Wrap ``module``'s PARTS so each call adds its wall time to ``seconds`` (the calls still run); returns the
    function that puts the originals back."""
    real = {name: getattr(module, name) for name in PARTS}
    for name, key in PARTS.items():
        def wrapper(*args, _real=real[name], _key=key, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                seconds[_key] = seconds.get(_key, 0.0) + time.perf_counter() - t0

        setattr(module, name, wrapper)
    return lambda: [setattr(module, name, fn) for name, fn in real.items()]


def main() -> None:
    from refusalscope import direction
    from refusalscope.config import DirectionSettings
    from refusalscope.lm import inference
    from refusalscope.lm.loading import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--n-train", type=int, help="training prompts per set (default: the step's)")
    ap.add_argument("--n-val", type=int, help="held-out prompts per set (default: the step's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, help="tokens generated per held-out ASR (default: the step's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu")
    given = {k: v for k, v in {"n_train": args.n_train, "n_val": args.n_val,
                               "max_new_tokens": args.max_new_tokens}.items() if v is not None}
    seconds: dict[bool, dict[str, float]] = {False: {}, True: {}}
    split = []  # batches run after the shared prefix (scoring forwards)
    real_split = inference.suffix_last_logits
    inference.suffix_last_logits = lambda *a, **k: split.append(1) or real_split(*a, **k)
    results = {}
    try:
        for shared in (False, True):
            restore = timed(direction, seconds[shared])
            try:
                settings = DirectionSettings(model=args.model, out="unused", data_dir=args.data_dir,
                                             batch_size=args.batch_size, share_prefix=shared, **given)
                t0 = time.perf_counter()
                results[shared], _ = direction.compute_direction(lm, settings)
                seconds[shared]["total"] = time.perf_counter() - t0
            finally:
                restore()
    finally:
        inference.suffix_last_logits = real_split
    plain, shared = results[False], results[True]
    ta, tb = shared.candidates, plain.candidates
    score = (torch.tensor(ta.ablation_score.values) - torch.tensor(tb.ablation_score.values)).abs()
    out = {
        "model": lm.name, "threads": torch.get_num_threads(), "n_train": settings.n_train, "n_val": settings.n_val,
        "candidates": len(tb), "batch_size": args.batch_size, "scoring_batches_split": len(split),
        **{f"{part}_plain_s": round(seconds[False][part], 2) for part in [*PARTS.values(), "total"]},
        **{f"{part}_shared_s": round(seconds[True][part], 2) for part in [*PARTS.values(), "total"]},
        "scoring_speedup": round(seconds[False]["scoring"] / seconds[True]["scoring"], 2),
        "mean_activations_speedup": round(seconds[False]["mean_activations"] / seconds[True]["mean_activations"], 2),
        "total_speedup": round(seconds[False]["total"] / seconds[True]["total"], 2),
        "layer_plain": plain.layer, "layer_shared": shared.layer, "same_choice": (plain.layer, plain.position)
        == (shared.layer, shared.position),
        "measured_plain": sorted(int(x) for x in tb[tb.asr.notna()].layer),
        "measured_shared": sorted(int(x) for x in ta[ta.asr.notna()].layer),
        "score_max_abs_diff": float(score[~score.isnan()].max()),
        "score_range": float(tb.ablation_score.max() - tb.ablation_score.min()),
        "direction_rel_diff": float((shared.direction - plain.direction).norm() / plain.direction.norm()),
        "mean_diffs_max_rel_diff": float(((shared.mean_diffs - plain.mean_diffs).norm(dim=-1)
                                          / plain.mean_diffs.norm(dim=-1).clamp(min=1e-12)).max()),
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
