"""The report's sections, each built from the run's own files only; a step the run lacks gives one line naming the
command that makes it. Tables are rendered generically (any columns an analysis writes are shown)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from refusalscope.report.blocks import RunFiles, Section, compact, image, pairs, table, text

MAKES = {
    "run": "refusalscope run --out RUN",
    "saes": "refusalscope sae train --run RUN (or refusalscope run)",
    "direction": "refusalscope direction --out RUN (or refusalscope run)",
    "stage1": "refusalscope run --out RUN --stages 1,2",
    "stage2": "refusalscope run --out RUN --stages 1,2",
    "stage3": "refusalscope interactions --run RUN",
    "annotation": "refusalscope annotate RUN",
    "prompts": "refusalscope run --out RUN",
}


def missing_line(files: RunFiles, step: str) -> str:
    command = MAKES.get(step, f"refusalscope analyze {step} --run RUN").replace("RUN", files.shown)
    return f"not in this run: run `{command}`"


def judge_name(files: RunFiles) -> str:
    summary = files.json("summary.json") or {}
    config = files.json("config.run.json") or {}
    return str(summary.get("judge") or config.get("judge") or "unknown")


def judged(files: RunFiles, what: str) -> dict:
    return text(f"{what} by the {judge_name(files)} judge (the substring judge counts vague answers as jailbreaks).")


# ---- the pipeline ------------------------------------------------------------------------------------------------

def run_section(files: RunFiles, opts) -> Section:
    s = Section("run", "Run configuration and model", "paper, Experimental setup")
    config, run, summary = files.json("config.run.json"), files.json("run.json"), files.json("summary.json")
    if config is None and run is None:
        s.missing = missing_line(files, "run")
        return s
    head = {k: summary[k] for k in ("n_prompts", "n_refused_baseline", "n_processed", "judge")
            if isinstance(summary, dict) and k in summary}
    s.blocks = compact([pairs(head, "Prompts"), pairs(run, "Model provenance (run.json)"),
                        pairs(config, "Resolved options (config.run.json)", collapsed=True)])
    return s


def sae_section(files: RunFiles, opts) -> Section:
    s = Section("saes", "SAEs and their quality", "paper, SAE setup; quality: FVU, L0, dead latents, CE increase")
    saes, quality = files.json("saes.json"), files.table("sae_eval.parquet")
    if saes is None and quality is None:
        s.missing = missing_line(files, "saes")
        return s
    provenance = {k: saes[k] for k in ("spec", "kind", "layers") if isinstance(saes, dict) and k in saes}
    if isinstance(saes, dict) and isinstance(saes.get("train"), dict) and "tokens" in saes["train"]:
        provenance["training tokens"] = saes["train"]["tokens"]
    s.blocks = compact([pairs(provenance, "SAE set (saes.json)"),
                        table(quality, "Quality on held-out text (sae_eval.parquet)", max_rows=opts.max_rows)
                        or text("sae_eval.parquet is not in this run: run `refusalscope sae eval --run "
                                f"{files.shown}`")])
    return s


def direction_section(files: RunFiles, opts) -> Section:
    s = Section("direction", "Refusal direction and layer selection",
                "Arditi et al.; paper appendix, cosine diagnostic of Figs. 4/5")
    meta = files.json("direction.json")
    if meta is None:
        s.missing = missing_line(files, "direction")
        return s
    cos = files.table("cosine_diagnostics.parquet")
    if cos is not None and {"layer", "group", "mean_cos"} <= set(cos.columns):
        cos = cos.pivot_table(index="layer", columns="group", values="mean_cos").reset_index()
        cos.columns = [str(c) if c == "layer" else f"mean cos ({c})" for c in cos.columns]
    s.blocks = compact([
        pairs(meta, "Selected direction (direction.json)", skip=("positions",)),
        table(files.table("direction_candidates.parquet"), "Per-layer candidate scores (direction_candidates.parquet)",
              max_rows=opts.max_rows),
        image(files.image("cosine_diagnostics.png"), "Cosine diagnostic (Figs. 4/5)",
              "cosine of each layer's activations with the refusal direction"),
        table(cos, "Cosine diagnostic by layer (cosine_diagnostics.parquet)", max_rows=opts.max_rows)])
    return s


def stage1_section(files: RunFiles, opts) -> Section:
    s = Section("stage1", "Stage 1: top-K features by cos(W_dec, r)", "paper, Stage 1; Tables 1/2")
    summary = (files.json("summary.json") or {}).get("stage1")
    frame = files.table("stage1.parquet")
    if summary is None and frame is None:
        s.missing = missing_line(files, "stage1")
        return s
    baseline = files.table("baseline.parquet")
    base = None
    if baseline is not None and "refused" in baseline.columns:
        base = {"prompts": len(baseline), "refused at baseline": int(baseline["refused"].sum())}
    s.blocks = compact([judged(files, "Refusals and jailbreaks are judged"), pairs(base, "Baseline"),
                        pairs(summary, "Stage 1 (summary.json)"),
                        table(frame, "Per prompt (stage1.parquet)",
                              columns=["id", "prompt", "k", "size", "jailbroken", "degenerate", "completion"],
                              max_rows=opts.max_rows)])
    return s


def keyed_rows(summary, key: str, column: str) -> pd.DataFrame | None:
    """``summary[key]``, a mapping of name → row dict (summary.json's per-τ and equal-K blocks), as a table whose
    first column ``column`` holds the names; None when the summary lacks it."""
    block = summary.get(key) if isinstance(summary, dict) else None
    if not isinstance(block, dict):
        return None
    return pd.DataFrame([{column: name, **row} for name, row in block.items() if isinstance(row, dict)])


def stage2_section(files: RunFiles, opts) -> Section:
    s = Section("stage2", "Stage 2: Algorithm 1, the pruned sets", "paper, Stage 2; Algorithm 1; Table 1")
    summary = files.json("summary.json") or {}
    st2, frame = summary.get("stage2"), files.table("stage2.parquet")
    if st2 is None and frame is None:
        s.missing = missing_line(files, "stage2")
        return s
    per_tau = keyed_rows(st2, "per_tau", "tau")
    best = st2.get("best_tau") if isinstance(st2, dict) else None
    at_best = frame
    if frame is not None and best is not None and "tau" in frame.columns:
        at_best = frame[(frame["tau"] - float(best)).abs() < 1e-9]
    s.blocks = compact([
        judged(files, "Jailbreaks are judged"),
        pairs(st2, "Stage 2 (summary.json)", skip=("per_tau",)),
        table(per_tau, "Jailbreaks per τ (Table 1)", max_rows=opts.max_rows),
        image(files.image("stages.png"), "Stages 1-2 (stages.png)", "jailbreaks and set sizes per τ"),
        table(at_best, f"Per prompt at the best τ = {best} (stage2.parquet)" if best is not None else
              "Per prompt (stage2.parquet)", columns=["id", "tau", "size", "seed_sizes", "jailbroken", "features",
                                                      "completion"], max_rows=opts.max_rows),
        pairs(summary.get("random_control"), "Equal-size random active features (control)"),
        pairs(summary.get("inactive_features"), "Inactive Stage-2 features (paper, Redundant Features)"),
        table(files.table("controls.parquet"), "Controls per prompt (controls.parquet)", max_rows=opts.max_rows)])
    return s


def stage3_section(files: RunFiles, opts) -> Section:
    s = Section("stage3", "Stage 3: feature interactions (FM vs linear probe)", "paper, Stage 3; Eq. 2; Table 2")
    st3, frame = (files.json("summary.json") or {}).get("stage3"), files.table("stage3.parquet")
    if st3 is None and frame is None:
        s.missing = missing_line(files, "stage3")
        return s
    equal_k = keyed_rows(st3, "probe_equal_k", "K")
    curve = None
    if frame is not None and {"method", "k", "jailbroken"} <= set(frame.columns):
        g = frame.groupby(["k", "method"])["jailbroken"]
        curve = (g.sum().astype(int).astype(str) + "/" + g.count().astype(str)).unstack("method").reset_index()
        curve.columns = [str(c) for c in curve.columns]
    s.blocks = compact([
        judged(files, "Jailbreaks are judged"),
        pairs(st3, "Stage 3 (summary.json)", skip=("probe_equal_k", "columns")),
        table(equal_k, "FM vs probe at equal K (jailbroken prompts)", max_rows=opts.max_rows),
        table(curve, "Jailbreaks per K and method (jailbroken / judged, stage3.parquet)", max_rows=opts.max_rows),
        image(files.image("stage3.png"), "Stage 3 (stage3.png)", "jailbreaks per K, FM vs probe")])
    return s


# ---- the analyses ------------------------------------------------------------------------------------------------

def analysis_section(files: RunFiles, opts, name: str, title: str, paper: str,
                     images: list[tuple[str, str]] = (), tables: list[tuple[str, str]] = (),
                     extra: Callable[[RunFiles, dict, object], list] | None = None) -> Section:
    """A section over ``analyses/NAME/``: its summary, figures and tables, whatever their columns."""
    s = Section(name, title, paper)
    base = f"analyses/{name}"
    names = [f"{base}/summary.json", *(f"{base}/{f}" for f, _ in images), *(f"{base}/{f}" for f, _ in tables)]
    if not files.exists(*names):
        s.missing = missing_line(files, name)
        return s
    summary = files.json(f"{base}/summary.json") or {}
    options = summary.get("options") if isinstance(summary.get("options"), dict) else None
    if "judge" in summary and summary["judge"] is None:  # e.g. the taxonomy: activation-based, nothing judged
        judge_line = text("No completion is judged in this analysis (its numbers are activation-based).")
    else:
        judge = summary.get("judge") or (options or {}).get("judge") or judge_name(files)
        judge_line = text(f"Completions in this analysis are judged by the {judge} judge.")
    s.blocks = compact([
        judge_line,
        pairs(summary, "Summary (summary.json)", skip=("options", "analysis")),
        *(image(files.image(f"{base}/{f}"), caption, f) for f, caption in images),
        *(table(files.table(f"{base}/{f}", head=opts.max_rows), f"{caption} ({f})", max_rows=opts.max_rows)
          for f, caption in tables),
        *(extra(files, summary, opts) if extra else []),
        pairs(options, "Options", collapsed=True)])
    return s


def hydra_section(files, opts):
    return analysis_section(files, opts, "hydra", "Dormant (hydra) features", "paper, Redundant Features; Fig. 2",
                            images=[("graph.png", "Which ablation wakes which feature")],
                            tables=[("jailbreak.parquet", "Jailbreaks with and without the dormant features"),
                                    ("segments.parquet", "Where the woken features fire (first-token share)"),
                                    ("dormant.parquet", "Dormant features"), ("woken.parquet", "Woken features"),
                                    ("edges.parquet", "Graph edges: ablated → woken"),
                                    ("tokens.parquet", "Woken features' tokens")])


def controls_section(files, opts):
    return analysis_section(files, opts, "controls", "Controls and the O'Brien et al. baseline", "paper, Fig. 6",
                            images=[("obrien.png", "ASR vs k (O'Brien et al.)")],
                            tables=[("obrien_asr.parquet", "ASR per k"),
                                    ("random.parquet", "Equal-size random active features"),
                                    ("obrien.parquet", "O'Brien et al. sets per prompt and k")])


def ce_section(files, opts):
    return analysis_section(files, opts, "ce", "Cross-entropy cost of the ablations", "paper, Table 9",
                            tables=[("ce_table.parquet", "CE loss (Table 9)"),
                                    ("ce.parquet", "CE per condition, set and corpus")])


def clamp_section(files, opts):
    return analysis_section(files, opts, "clamp", "Clamping the redundant features", "paper, Tables 5/6",
                            images=[("clamp.png", "Refusal rate vs clamp value")],
                            tables=[("refusal_rates.parquet", "Refusal rates"),
                                    ("completions.parquet", "Completions"), ("sites.parquet", "Where each feature "
                                                                             "was clamped")])


def taxonomy_section(files, opts):
    return analysis_section(files, opts, "taxonomy", "Taxonomy: CoCoNot categories per feature", "paper, Fig. 3",
                            images=[("taxonomy.png", "Features per category")],
                            tables=[("counts.parquet", "Features by number of categories"),
                                    ("category_counts.parquet", "Features per category"),
                                    ("features.parquet", "Features and categories")])


def _explanation_table(files: RunFiles, summary: dict, opts) -> list:
    from refusalscope.annotate.inputs import read_explanations

    records = read_explanations(files.root)
    if not records:
        return []
    frame = pd.DataFrame([{"feature": f, "source": r.get("source"), "groups": r.get("groups"),
                           "explanation": r.get("text"), "contexts": len(r.get("contexts") or [])}
                          for f, r in sorted(records.items())])
    return [table(frame, "Explanations (explanations.json)", max_rows=opts.max_rows)]


def explain_section(files, opts):
    return analysis_section(files, opts, "explain", "Feature explanations and semantics",
                            "paper, Tables 4, 7, 8, 10, 11",
                            tables=[("top_terms.parquet", "Top terms (Table 4)"),
                                    ("themes.parquet", "Themes (Tables 7, 8, 10, 11)"),
                                    ("feature_themes.parquet", "Each feature's themes")],
                            extra=_explanation_table)


def annotation_section(files: RunFiles, opts) -> Section:
    """The human annotation (paper, Fig. 7), scored as in the app."""
    from refusalscope.annotate import inputs
    from refusalscope.annotate.scoring import DEFINITIONS, agreement, percent
    from refusalscope.annotate.store import FILE, AnnotationStore

    s = Section("annotation", "Human annotation of the taxonomy", "paper, Fig. 7 (13.42% with three annotators)")
    if not files.exists(FILE):
        s.missing = missing_line(files, "annotation")
        return s
    store = AnnotationStore(files.path(FILE))
    try:
        truth = inputs.activation_labels(inputs.read_features(files.root))
    except Exception as e:  # the taxonomy was removed after annotating
        s.notes.append(str(e))
        truth = {}
    result = agreement(store.answers(), dict(store.items()), truth, votes=opts.votes,
                       min_annotators=opts.min_annotators)
    t = result["total"]
    totals = {"sampled features": len(store.items()), "annotators": len(store.progress()),
              "scored features": t["n"], "exact": percent(t["exact"]), "partial (Jaccard)": percent(t["partial"]),
              "overlap": percent(t["overlap"])}
    by_source = pd.DataFrame([{"source": k, "scored": v["n"], "exact": percent(v["exact"]),
                               "partial": percent(v["partial"]), "overlap": percent(v["overlap"])}
                              for k, v in result["by_source"].items()])
    s.blocks = compact([
        text(f"Majority label: categories ticked by at least {opts.votes} annotators; a feature is scored once "
             f"{opts.min_annotators} annotators answered it. exact: {DEFINITIONS['exact']}; partial: "
             f"{DEFINITIONS['partial']}; overlap: {DEFINITIONS['overlap']}."),
        pairs(totals, "Accuracy against the activation-based labels"),
        table(by_source if len(by_source) else None, "By sample source"),
        table(result["features"] if len(result["features"]) else None, "Scored features", max_rows=opts.max_rows),
        table(pd.DataFrame(store.progress(), columns=["annotator", "answers"]), "Annotators")])
    return s


SECTIONS: list[Callable[[RunFiles, object], Section]] = [
    run_section, sae_section, direction_section, stage1_section, stage2_section, stage3_section, hydra_section,
    controls_section, ce_section, clamp_section, taxonomy_section, explain_section, annotation_section,
]


def build_section(builder, files: RunFiles, opts) -> Section:
    """One section; an unreadable or unexpected file becomes a note in the section, never a failed report."""
    before = len(files.problems)
    try:
        section = builder(files, opts)
    except Exception as e:
        name = getattr(builder, "__name__", "section").removesuffix("_section")
        section = Section(name, name, blocks=[])
        section.notes.append(f"this section could not be built: {type(e).__name__}: {e}")
    section.notes += files.problems[before:]
    return section
