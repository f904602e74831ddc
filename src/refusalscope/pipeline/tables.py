"""The run's result tables, figure and summary, rebuilt from the per-prompt records at the end of every run.

stage1.parquet, stage2.parquet (one row per prompt × τ: the paper's Table 1), stage2_chains.parquet (Δ traces),
controls.parquet, stages.png and summary.json; every table loads with ``pandas.read_parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from refusalscope.config import RunSettings
from refusalscope.pipeline.records import PromptRecord
from refusalscope.saes.features import feature_strings
from refusalscope.stages.plots import plot_stages
from refusalscope.store import RunStore

STAGE2_COLUMNS = ["id", "tau", "size", "seed_sizes", "jailbroken", "degenerate", "features", "completion"]
CONTROL_COLUMNS = ["id", "kind", "size", "jailbroken", "completion"]


def stage1_table(records: Sequence[PromptRecord]) -> pd.DataFrame:
    return pd.DataFrame([{"id": r.id, "prompt": r.prompt, "k": r.stage1.k, "size": r.stage1.size,
                          "jailbroken": r.stage1.jailbroken, "degenerate": r.stage1.degenerate,
                          "features": feature_strings(r.stage1.features), "completion": r.stage1.completion}
                         for r in records])


def stage2_tables(records: Sequence[PromptRecord]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(stage2, chains, controls) tables."""
    rows, chains, controls = [], [], []
    for r in records:
        if r.stage2 is not None:
            for t in r.stage2.per_tau:
                rows.append({"id": r.id, "tau": t.tau, "size": t.size, "seed_sizes": t.seed_sizes,
                             "jailbroken": t.jailbroken, "degenerate": t.degenerate,
                             "features": feature_strings(t.features), "completion": t.completion})
            for c in r.stage2.chains:
                for step, (block, delta) in enumerate(zip(c.blocks, c.deltas)):
                    chains.append({"id": r.id, "seed": c.seed, "step": step, "block": feature_strings(block),
                                   "p_before": c.probs[step], "p_after": c.probs[step + 1], "delta": delta})
        if r.controls is not None:
            for x in r.controls.random:
                controls.append({"id": r.id, "kind": "random", "size": len(x.features), "jailbroken": x.jailbroken,
                                 "completion": x.completion})
            if r.controls.without_inactive is not None:
                controls.append({"id": r.id, "kind": "without_inactive",
                                 "size": r.controls.size - r.controls.n_inactive,
                                 "jailbroken": r.controls.without_inactive.jailbroken,
                                 "completion": r.controls.without_inactive.completion})
    return (pd.DataFrame(rows, columns=STAGE2_COLUMNS), pd.DataFrame(chains),
            pd.DataFrame(controls, columns=CONTROL_COLUMNS))


def best_tau(per_tau: dict, taus: Sequence[float]) -> float:
    """Our choice: the τ that jailbreaks the most prompts, ties broken by the smaller mean set (the paper reports
    every τ and names none)."""
    return max(taus, key=lambda t: (per_tau[f"{t:g}"]["jailbroken"], -(per_tau[f"{t:g}"]["mean_size"] or 0)))


def write_results(store: RunStore, records: Sequence[PromptRecord], n_prompts: int, n_refused: int,
                  settings: RunSettings) -> dict:
    """Write every Stage-1/2 table, stages.png and summary.json; return the summary."""
    s1 = stage1_table(records)
    store.write_table("stage1.parquet", s1)
    summary: dict = {"n_prompts": n_prompts, "n_refused_baseline": n_refused, "n_processed": len(records),
                     "judge": settings.judge,
                     # early-stopped completions end where the judge's verdict became fixed (--early-stop)
                     "completions": "stopped early by the judge" if settings.early_stop else "full length",
                     "stage1": {"jailbroken": int(s1.jailbroken.sum()) if len(s1) else 0,
                                "mean_k": float(s1.k.dropna().mean()) if len(s1) and s1.k.notna().any() else None,
                                "mean_size": float(s1["size"].mean()) if len(s1) else None}}
    if "2" in settings.stages:
        s2, chains, ctrl = stage2_tables(records)
        store.write_table("stage2.parquet", s2)
        store.write_table("stage2_chains.parquet", chains)
        store.write_table("controls.parquet", ctrl)
        per_tau = {}
        for t in settings.tau:
            sub = s2[s2.tau == t]
            per_tau[f"{t:g}"] = {"jailbroken": int(sub.jailbroken.sum()), "n": int(len(sub)),
                                 "mean_size": float(sub["size"].mean()) if len(sub) else None}
        best = best_tau(per_tau, settings.tau)
        rnd = ctrl[ctrl.kind == "random"]
        wo = ctrl[ctrl.kind == "without_inactive"]
        checks = [r.controls for r in records if r.controls is not None and r.controls.size]
        summary["stage2"] = {"best_tau": best, "jailbroken": per_tau[f"{best:g}"]["jailbroken"],
                             "mean_size": per_tau[f"{best:g}"]["mean_size"], "per_tau": per_tau}
        summary["random_control"] = {"jailbroken": int(rnd.jailbroken.sum()), "n": int(len(rnd))}
        summary["inactive_features"] = {
            "prompts_with_inactive": sum(1 for c in checks if c.n_inactive),
            "inactive": sum(c.n_inactive for c in checks), "features": sum(c.size for c in checks),
            "jailbreak_fails_without_them": int((~wo.jailbroken.astype(bool)).sum()) if len(wo) else 0,
            "n_tested": int(len(wo))}
        if len(s2):
            store.save_figure("stages.png", plot_stages(s1, s2, best, int(rnd.jailbroken.sum()), int(len(rnd))))
    if store.exists("summary.json"):  # keep what later steps (Stage 3, analyses) added
        old = store.read_json("summary.json")
        summary = {**{k: v for k, v in old.items() if k not in summary}, **summary}
    store.write_json("summary.json", summary)
    return summary


STAGE3_COLUMNS = ["id", "method", "k", "size", "jailbroken", "degenerate", "refused", "completion"]


def stage3_table(results) -> pd.DataFrame:
    """One row per prompt × method × K (methods: fm, probe, stage3_only)."""
    rows = []
    for r in results:
        for x in [*r.sweep, *([r.stage3_only] if r.stage3_only else [])]:
            rows.append({"id": r.id, "method": x.method, "k": x.k, "size": x.size, "jailbroken": x.jailbroken,
                         "degenerate": x.degenerate, "refused": x.refused, "completion": x.completion})
    return pd.DataFrame(rows, columns=STAGE3_COLUMNS)


def _equal_k(table: pd.DataFrame) -> dict:
    out = {}
    for k in sorted(table[table.method == "probe"].k.unique().tolist()):
        fm_at = table[(table.method == "fm") & (table.k == k)]
        pr_at = table[(table.method == "probe") & (table.k == k)]
        out[str(k)] = {"fm": int(fm_at.jailbroken.sum()), "probe": int(pr_at.jailbroken.sum()), "n": int(len(pr_at))}
    return out


def stage3_summary(results, report: dict, table: pd.DataFrame, stage2_jailbroken: dict | None = None) -> dict:
    """summary.json's ``stage3`` object: FM fit, FM and probe jailbreaks (at equal K), Stage-3 only, causal link;
    ``stage2_failed`` repeats the counts over the prompts whose Stage-2 set did not jailbreak on its own (there the
    added features must do the work)."""
    import numpy as np

    best = [r.best_k for r in results if r.best_k is not None]
    equal_k = _equal_k(table)
    probe_any = table[table.method == "probe"].groupby("id").jailbroken.any()
    causal = [r.causal for r in results if r.causal is not None]
    only = [r.stage3_only for r in results if r.stage3_only is not None]
    failed = [r.id for r in results if stage2_jailbroken is not None and not stage2_jailbroken.get(r.id, False)]
    sub = table[table.id.isin(failed)]
    stage2_failed = {"n": len(failed),
                     "fm": {"jailbroken": sum(r.best_k is not None for r in results if r.id in failed)},
                     "probe": {"jailbroken": int(sub[sub.method == "probe"].groupby("id").jailbroken.any().sum())},
                     "probe_equal_k": _equal_k(sub)}
    return {
        "n_prompts": len(results),
        "stage2_failed": stage2_failed,
        "fm_test_accuracy": report["fm_test_accuracy"], "fm_test_auroc": report["fm_test_auroc"],
        "probe_test_accuracy": report["probe_test_accuracy"], "probe_test_auroc": report["probe_test_auroc"],
        "mode": report["mode"], "columns": report["columns"],
        "fm": {"jailbroken": len(best), "best_k": float(np.median(best)) if best else None},
        "probe": {"jailbroken": int(probe_any.sum())},
        "probe_equal_k": equal_k,
        "stage3_only": {"jailbroken": sum(x.jailbroken for x in only), "n": len(only)},
        "causal": {"n": len(causal),
                   "deactivated_frac": float(np.mean([c.switched_off_frac for c in causal])) if causal else None,
                   "mean_drop": (float(np.mean([c.mean_relative_drop for c in causal
                                                if c.mean_relative_drop is not None]))
                                 if any(c.mean_relative_drop is not None for c in causal) else None)},
    }


def write_stage3_results(store: RunStore, results, report: dict, stage2_jailbroken: dict | None = None) -> dict:
    """stage3.parquet, stage3.png and the ``stage3`` object of summary.json; returns the summary."""
    from refusalscope.stages.plots import plot_stage3

    table = stage3_table(results)
    store.write_table("stage3.parquet", table)
    store.save_figure("stage3.png", plot_stage3(table, len(results)))
    summary = store.read_json("summary.json")
    summary["stage3"] = stage3_summary(results, report, table, stage2_jailbroken)
    store.write_json("summary.json", summary)
    return summary
