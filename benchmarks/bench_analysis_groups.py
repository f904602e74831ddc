"""``refusalscope analyze hydra|controls`` on a finished run's first prompts, one prompt at a time and in groups.

    # CPU, the default model's finished run: 8 prompts of the controls analysis alone, then in groups of 4
    python benchmarks/bench_analysis_groups.py --run runs/default --analysis controls --n 8 --groups 1,4
    python benchmarks/bench_analysis_groups.py --run runs/default --analysis hydra --n 8 --groups 1,4

Each group size runs on its own copy of the run, without its analyses and with an empty completion cache, so every
completion the analysis judges is generated (none is reused from the stages). Prints per group size the analysis'
seconds per prompt (the whole ``run_analysis`` call, model and SAE loading included, / n), the seconds spent
generating (and, for hydra, in its recording forwards), and whether every per-prompt file equals the one-at-a-time
files (and where not, which fields differ). One JSON object last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench_common import emit


def differences(a, b, at: str = "") -> list[str]:
    """The JSON paths where ``a`` and ``b`` differ (lists by index, dicts by key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{at}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{at}[{i}]")]
    return [] if a == b else [at or "."]


@contextmanager
def timed_calls(targets: dict[str, tuple[object, str]]):
    """Seconds spent inside each ``(module, function)`` of ``targets`` while the block runs, by name."""
    spent = {name: 0.0 for name in targets}
    saved = {name: getattr(mod, attr) for name, (mod, attr) in targets.items()}

    def timing(name, real):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return call

    for name, (mod, attr) in targets.items():
        setattr(mod, attr, timing(name, saved[name]))
    try:
        yield spent
    finally:
        for name, (mod, attr) in targets.items():
            setattr(mod, attr, saved[name])


def main(argv=None) -> dict:
    import torch

    from refusalscope.analysis import hydra
    from refusalscope.stages import context

    from refusalscope.analysis.registry import run_analysis
    from refusalscope.config import ControlsSettings, HydraSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished run with Stages 1-2 (and 3, for hydra's Stage-3 sets)")
    ap.add_argument("--analysis", choices=["hydra", "controls"], default="controls")
    ap.add_argument("--n", type=int, default=8, help="the run's first N processed prompts (--limit)")
    ap.add_argument("--groups", default="1,4", help="--prompt-batch values to time (the first is the reference)")
    ap.add_argument("--judge", default=None, help="judge (default: the run's)")
    ap.add_argument("--keep", default=None, help="keep each group size's copy of the run under this directory")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    settings_class = {"hydra": HydraSettings, "controls": ControlsSettings}[args.analysis]
    sizes = [int(g) for g in args.groups.split(",") if g]
    out: dict = {"run": str(args.run), "analysis": args.analysis, "n": args.n, "threads": torch.get_num_threads(),
                 "by_group": {}}
    first: dict[str, str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for g in sizes:
            copy = Path(args.keep or tmp) / f"group{g}"
            shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("analyses", "completions.sqlite",
                                                                          "report.html"))
            settings = settings_class(run=copy, limit=args.n, prompt_batch=g, device="cpu",
                                      **({"judge": args.judge} if args.judge else {}))
            # where the time goes: generation (grouped), and hydra's recording forwards (one prompt at a time)
            parts = {"generate": (context, "generate")}
            if args.analysis == "hydra":
                parts["record"] = (hydra, "record_with_wakes")
            with timed_calls(parts) as spent:
                t0 = time.perf_counter()
                summary = run_analysis(args.analysis, settings, progress=False)
                seconds = time.perf_counter() - t0
            files = {p.name: p.read_text() for p in sorted((copy / "analyses" / args.analysis / "prompts")
                                                          .glob("*.json"))}
            first = files if first is None else first
            diff = {name: differences(json.loads(first[name]), json.loads(text)) for name, text in files.items()
                    if name in first and text != first[name]}
            out["by_group"][str(g)] = {"seconds": round(seconds, 1), "s_per_prompt": round(seconds / args.n, 2),
                                       **{f"{k}_s": round(v, 3) for k, v in spent.items()},
                                       "prompts": len(files), "same_files_as_first": files == first,
                                       "differences": diff, "judge": summary.get("judge")}
            print(f"--prompt-batch {g}: {seconds:.1f} s, {seconds / args.n:.2f} s per prompt, same files as "
                  f"--prompt-batch {sizes[0]}: {files == first}", flush=True)
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
