"""``analyze hydra``'s once-per-run outputs (tables, edges, graphs, figure) at the size of a large run.

    # CPU: the default-model run's hydra prompts, each copied 4 times under new ids (4 x the prompts)
    python benchmarks/bench_hydra_outputs.py --run RUN --copies 4

Reads the finished prompts of ``RUN/analyses/hydra/prompts`` (run ``refusalscope analyze hydra --run RUN`` first),
repeats them ``--copies`` times under new prompt ids (as a run with that many more prompts would hold, every
prompt's findings alike; with ``--distinct`` every copy's latents shifted, so no edge repeats), and times
``hydra.write_outputs`` into a temporary run directory with the default analysis settings (wake scope "all":
every layer-block x every woken latent is an edge; graph_all keeps 5,000 edges). Prints seconds, the process's
peak RSS, the edge count and file sizes; one JSON object last (also written to ``--json``)."""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_common import emit


FEATURE_LISTS = ("features", "dormant", "active", "ablated")  # HydraPrompt's JSON fields holding [layer, latent]s


def _pairs(obj):
    """Every [layer, latent] of a HydraPrompt's JSON form."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "feature":
                yield v
            elif k in FEATURE_LISTS:
                yield from v
            else:
                yield from _pairs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _pairs(v)


def _shifted(obj, by: int):
    """A HydraPrompt's JSON form with every latent + ``by``."""
    if isinstance(obj, dict):
        return {k: [v[0], v[1] + by] if k == "feature" else [[a, b + by] for a, b in v] if k in FEATURE_LISTS
                else _shifted(v, by) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shifted(v, by) for v in obj]
    return obj


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory whose hydra analysis has finished")
    ap.add_argument("--copies", type=int, default=1, help="times each prompt is repeated under a new id")
    ap.add_argument("--distinct", action="store_true", help="shift every latent of copy c by c x the largest latent "
                    "+ 1, so no edge repeats across copies (the worst case for the graph totals' memory)")
    ap.add_argument("--out", default=None, help="write the outputs here (an empty directory) instead of a temporary")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from refusalscope.analysis.hydra import HydraPrompt, write_outputs
    from refusalscope.config import HydraSettings
    from refusalscope.store import RunStore

    files = sorted(Path(args.run, "analyses/hydra/prompts").glob("*.json"))
    if not files:
        sys.exit(f"no hydra prompts under {args.run}/analyses/hydra/prompts: run `refusalscope analyze hydra` first")
    t0 = time.perf_counter()
    one = [HydraPrompt.model_validate_json(f.read_text()) for f in files]
    load_s = time.perf_counter() - t0
    step = max(r.id for r in one) + 1
    if args.distinct:
        width = 1 + max(x[1] for r in one for x in _pairs(r.model_dump(mode="json")))
        results = [HydraPrompt.model_validate(_shifted(r.model_dump(mode="json"), c * width) | {"id": r.id + c * step})
                   for c in range(args.copies) for r in one]
    else:
        results = [r.model_copy(update={"id": r.id + c * step}) for c in range(args.copies) for r in one]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(args.out or tmp)
        t0 = time.perf_counter()
        summary = write_outputs(store, results, HydraSettings(run=args.run))
        seconds = time.perf_counter() - t0
        sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(store.path("analyses/hydra").iterdir())
                 if p.is_file()}
        import pyarrow.parquet as pq

        edge_rows = pq.ParquetFile(store.path("analyses/hydra/edges.parquet")).metadata.num_rows
    out = {"prompts": len(results), "copies": args.copies, "distinct": args.distinct, "load_s": round(load_s, 2),
           "write_outputs_s": round(seconds, 2), "edge_rows": edge_rows,
           "graph_edges": {k: v["graph"]["edges"] for k, v in summary["scopes"].items()},
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "rss_before_outputs_mb": round(rss0), "file_mb": sizes}
    print(f"{len(results)} prompts ({args.copies} x {len(one)}): write_outputs {seconds:.1f} s, {edge_rows:,} edge "
          f"rows, peak RSS {out['peak_rss_mb']:,} MB ({out['rss_before_outputs_mb']:,} MB before the outputs)")
    emit(out, args.json)
    return out


if __name__ == "__main__":
    main()
