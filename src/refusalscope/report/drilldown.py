"""The per-prompt drill-down: baseline and ablated completions side by side, and each feature set with its
explanations and top-activating contexts (paper, Tables 1/2 per prompt; Tables 4, 7, 8 for the features)."""

from __future__ import annotations

from refusalscope.report.blocks import RunFiles, Section
from refusalscope.report.sections import judge_name, missing_line


def _verdict(jailbroken, refused=None, degenerate=None) -> str:
    if degenerate:
        return "degenerate"
    if jailbroken:
        return "jailbroken"
    return "refused" if refused is None or refused else "not jailbroken"


def _features(feats, explanations: dict, limit: int) -> dict:
    """A feature set for the page: the first ``limit`` with explanation and contexts, the rest by name."""
    from refusalscope.annotate.inputs import display_contexts

    names = [str(f) for f in feats]
    shown = [{"id": f, "text": str((explanations.get(f) or {}).get("text") or ""),
              "contexts": display_contexts(explanations.get(f), 5)} for f in names[:limit]]
    return {"n": len(names), "shown": shown, "rest": names[limit:]}


def drilldown_section(files: RunFiles, opts) -> Section:
    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.annotate.inputs import read_explanations

    s = Section("prompts", "Per-prompt drill-down", "paper, Tables 1/2 per prompt; features: Tables 4, 7, 8")
    if not files.exists("config.run.json", "summary.json") or not files.exists("prompts"):
        s.missing = missing_line(files, "prompts")
        return s
    finished = FinishedRun(files.root)
    records = finished.records
    if not records:
        s.missing = missing_line(files, "prompts")
        return s
    baseline = files.table("baseline.parquet")
    base = {}
    if baseline is not None and "id" in baseline.columns:
        base = {int(r["id"]): r for r in baseline.to_dict("records")}
    explanations = read_explanations(files.root)
    judge = judge_name(files)
    prompts = []
    for rec in records[:opts.max_prompts]:
        columns = []
        b = base.get(rec.id)
        if b is not None:
            columns.append({"label": "baseline (no ablation)", "completion": str(b.get("completion", "")),
                            "verdict": _verdict(b.get("jailbroken"), b.get("refused"), b.get("degenerate"))})
        st1 = rec.stage1
        columns.append({"label": f"Stage 1 (K = {st1.k}, {st1.size} features)", "completion": st1.completion,
                        "verdict": _verdict(st1.jailbroken, st1.refused, st1.degenerate)})
        sets = []
        if rec.stage2 is not None:
            best = rec.stage2.best()
            columns.append({"label": f"Stage 2 (τ = {best.tau:g}, {best.size} features)",
                            "completion": best.completion,
                            "verdict": _verdict(best.jailbroken, best.refused, best.degenerate)})
            sets.append({"label": f"Stage 2 set (τ = {best.tau:g})", **_features(best.features, explanations,
                                                                                  opts.max_features)})
        elif rec.stage2_skipped:
            columns.append({"label": "Stage 2", "completion": "", "verdict": f"skipped: {rec.stage2_skipped}"})
        res = finished.stage3.get(rec.id)
        if res is not None:
            fm = [k for k in res.sweep if k.method == "fm"]
            chosen = next((k for k in fm if k.k == res.best_k), fm[-1] if fm else None)
            if chosen is not None:
                columns.append({"label": f"Stage 3 (FM, K = {chosen.k}, {chosen.size} features)",
                                "completion": chosen.completion,
                                "verdict": _verdict(chosen.jailbroken, chosen.refused, chosen.degenerate)})
            new = res.fm_ranking[:res.best_k] if res.best_k else []
            sets.append({"label": f"Stage 3: the FM's top {len(new)} new features", **_features(
                new, explanations, opts.max_features)})
        sets.append({"label": "Stage 1 set", **_features(st1.features, explanations, opts.max_features)})
        prompts.append({"id": rec.id, "prompt": rec.prompt, "columns": columns, "sets": sets})
    more = len(records) - len(prompts)
    s.blocks = [{"kind": "text", "text": f"Verdicts by the {judge} judge."},
                {"kind": "prompts", "prompts": prompts, "more": more}]
    return s
