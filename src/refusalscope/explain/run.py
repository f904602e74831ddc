"""``refusalscope analyze explain --run RUN``: an explanation for every feature the run found (paper, Tables 4, 7,
8, 10, 11), and the feature-semantics tables.

Features: the run's pipeline features (Stages 1–3, hydra) plus those of ``analyses/taxonomy/features.parquet``
when present (the annotation app's random features). Per feature, the first backend that has text wins:
Neuronpedia (SAE sets it publishes), then the LLM explainer (``--llm-url``), then the offline one-line fallback;
every record carries the feature's top contexts from one local pass over the corpus.

Writes under ``analyses/explain/``: ``explanations.json`` ({"features": {feature: record}}, read by the report and
the annotation app), ``explanations.parquet`` (flat), ``top_terms.parquet`` (Table 4), ``themes.parquet``
(Tables 7/8/10/11), ``feature_themes.parquet``, ``contexts.json`` (the pass, reused while its inputs are the same)
and ``llm/<feature>.json`` (one per LLM explanation, reused on rerun).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.config import ExplainSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.explain import fallback, semantics
from refusalscope.explain.client import EndpointError, Unreachable
from refusalscope.explain.records import (
    EXPLANATIONS_JSON,
    EXPLANATIONS_TABLE,
    Explanation,
    TopContext,
    explanations_json,
    explanations_table,
)
from refusalscope.saes.features import Feature
from refusalscope.store import digest

log = logging.getLogger(__name__)

NEEDS = ("stage1",)
OUT = "analyses/explain"
TAXONOMY_FEATURES = "analyses/taxonomy/features.parquet"
_SHOWN_MISSING = 5  # missing-explanation messages logged one by one; the rest are counted


# ---- which features ---------------------------------------------------------------------------------------------

def features_to_explain(finished: FinishedRun, limit: int | None = None) -> dict[Feature, list[str]]:
    """Pipeline features (with their groups) plus the taxonomy analysis' features; ``limit``: only the pipeline
    features of the first N prompts (hydra and taxonomy features are kept)."""
    groups = {f: set(g) for f, g in finished.pipeline_features().items()}
    if limit is not None:
        keep = set()
        for rec in finished.records[:limit]:
            keep |= {*rec.stage1.features, *finished.stage2_set(rec), *finished.stage3_set(rec.id)}
        groups = {f: g for f, g in groups.items() if f in keep or "hydra" in g}
    if finished.store.exists(TAXONOMY_FEATURES):
        table = finished.store.read_table(TAXONOMY_FEATURES)
        if "feature" not in table.columns:
            raise RefusalScopeError(f"{finished.store.path(TAXONOMY_FEATURES)} has no 'feature' column")
        for i, text in enumerate(table["feature"]):
            if "source" in table.columns and table["source"].iloc[i] == "pipeline":
                continue  # already here, with its stage groups
            extra = ["taxonomy"]
            if "group" in table.columns:  # "random_active", or comma-joined groups
                extra = [g for g in str(table["group"].iloc[i]).split(",") if g] or extra
            groups.setdefault(Feature.parse(text), set()).update(extra)
    return {f: sorted(g) for f, g in sorted(groups.items())}


def corpus_prompts(finished: FinishedRun, settings: ExplainSettings) -> list[str]:
    """The corpus sets' prompts, without the prompts the run evaluated, deduplicated in order."""
    from refusalscope.data import load_prompts

    data_dir = settings.data_dir or finished.data_dir
    evaluated = {" ".join(r.prompt.split()) for r in finished.records}
    out: list[str] = []
    for name in settings.corpus:
        texts = load_prompts(name, data_dir=data_dir).texts
        texts = [t for t in texts if " ".join(t.split()) not in evaluated]
        out.extend(texts[:settings.corpus_limit] if settings.corpus_limit else texts)
    return list(dict.fromkeys(out))


# ---- the backends -----------------------------------------------------------------------------------------------

def local_contexts(finished: FinishedRun, settings: ExplainSettings, features: Sequence[Feature],
                   prompts: Sequence[str], progress: bool) -> tuple[dict[Feature, list[TopContext]], dict]:
    """The one top-context pass over ``prompts``, or its saved result when the inputs are unchanged
    (``contexts.json``)."""
    if not prompts:
        return {}, {"corpus": [], "n_texts": 0, "n_tokens": 0, "seconds": 0.0, "reused": False}
    key = digest({"prompts": list(prompts), "features": [str(f) for f in features], "n": settings.n_contexts,
                  "before": settings.window_before, "after": settings.window_after, "chat": settings.chat_format,
                  "saes": finished.store.read_json("saes.json"), "model": finished.store.read_json("run.json")
                  .get("model"), "dtype": settings.dtype})
    name = f"{OUT}/contexts.json"
    if finished.store.exists(name):
        saved = finished.store.read_json(name)
        if saved.get("digest") == key:
            contexts = {Feature.parse(k): [TopContext.model_validate(c) for c in v]
                        for k, v in saved["features"].items()}
            return contexts, {**saved["pass"], "reused": True}
    from refusalscope.explain.local import top_contexts

    start = time.perf_counter()
    ctx = finished.context(device=settings.device, dtype=settings.dtype, judge="substring",
                           batch_size=settings.batch_size, layers=sorted({f.layer for f in features}))
    load_seconds = time.perf_counter() - start
    result = top_contexts(ctx.lm, ctx.saes, features, prompts, n=settings.n_contexts, before=settings.window_before,
                          after=settings.window_after, batch_size=settings.batch_size, chat=settings.chat_format,
                          progress=progress)
    info = {"corpus": list(settings.corpus), "n_texts": result.n_texts, "n_tokens": result.n_tokens,
            "seconds": round(result.seconds, 2), "load_seconds": round(load_seconds, 2), "device": str(ctx.lm.device),
            "batch_size": settings.batch_size, "n_features": len(features)}
    finished.store.write_json(name, {"digest": key, "pass": info, "features": {
        str(f): [c.model_dump(mode="json") for c in cs] for f, cs in result.contexts.items()}})
    return result.contexts, {**info, "reused": False}


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("refusalscope")) / "neuronpedia"


def neuronpedia_sources(finished: FinishedRun, settings: ExplainSettings, layers: Sequence[int]) -> tuple[dict, str]:
    """(layer → Neuronpedia model/source, note): empty with a note when the SAE set has none and the mode is auto;
    an error when ``--neuronpedia api|exports`` cannot be served."""
    from refusalscope.explain.neuronpedia import sources_for_run

    if settings.neuronpedia == "off":
        return {}, ""
    saes = finished.store.read_json("saes.json")
    sources = sources_for_run(saes, layers, settings.neuronpedia_source)
    if sources:
        return sources, ""
    if settings.neuronpedia != "auto":
        raise RefusalScopeError(f"--neuronpedia {settings.neuronpedia}: the run's SAE set {saes.get('spec')} has no "
                                "Neuronpedia ids; pass --neuronpedia-source MODEL/{layer}-SOURCE, or --neuronpedia off")
    return {}, f"the run's SAE set {saes.get('spec')} has no Neuronpedia ids (skipped; --neuronpedia-source maps one)"


def neuronpedia_texts(settings: ExplainSettings, features: Sequence[Feature], sources: Mapping[int, str],
                      progress: bool) -> tuple[dict[Feature, str], dict[Feature, list[TopContext]], dict]:
    """Neuronpedia's explanation (and, from the API, contexts) of each feature its SAE set publishes."""
    from refusalscope.explain.neuronpedia import MissingExplanation, NeuronpediaClient, split_id

    info: dict = {"mode": settings.neuronpedia, "used": [], "missing": [], "errors": 0, "note": ""}
    if not sources:
        return {}, {}, info
    client = NeuronpediaClient(settings.cache_dir or default_cache_dir(), api_url=settings.neuronpedia_url,
                               exports_url=settings.neuronpedia_exports_url, offline=settings.offline,
                               retries=settings.retries, backoff=settings.backoff, timeout=settings.http_timeout)
    by_source: dict[str, list[Feature]] = {}
    for f in features:
        by_source.setdefault(sources[f.layer], []).append(f)
    texts: dict[Feature, str] = {}
    contexts: dict[Feature, list[TopContext]] = {}
    with tqdm(total=len(features), desc="neuronpedia", unit="feature", disable=not progress, leave=False) as bar:
        for source_id, fs in by_source.items():
            model, source = split_id(source_id)
            use_exports = settings.neuronpedia == "exports" or (
                settings.neuronpedia == "auto" and len(fs) > settings.neuronpedia_api_max)
            info["used"].append({"source": source_id, "via": "exports" if use_exports else "api", "n": len(fs)})
            for f in fs:
                bar.update(1)
                try:
                    if use_exports:
                        text = client.explanation_from_exports(model, source, f.latent)
                    else:
                        got = client.feature(model, source, f.latent, n_contexts=settings.n_contexts,
                                             before=settings.window_before, after=settings.window_after)
                        text, contexts[f] = got.text, got.contexts
                except MissingExplanation as e:
                    _missing(info, f, str(e))
                    continue
                except EndpointError as e:  # rate limit, server down, damaged export: stop asking, fall back
                    info["errors"] += 1
                    info["note"] = f"Neuronpedia failed ({e}); the remaining features use the other backends"
                    log.warning(info["note"])
                    return texts, contexts, info
                if text:
                    texts[f] = text
                else:
                    _missing(info, f, f"Neuronpedia has no explanation for {f} ({source_id}/{f.latent})")
    return texts, contexts, info


def _missing(info: dict, f: Feature, message: str) -> None:
    info["missing"].append(str(f))
    if len(info["missing"]) <= _SHOWN_MISSING:
        log.warning("%s; using the next backend", message)
    elif len(info["missing"]) == _SHOWN_MISSING + 1:
        log.warning("more Neuronpedia explanations are missing; their count is in the summary")


def llm_texts(finished: FinishedRun, settings: ExplainSettings, todo: Mapping[Feature, list[TopContext]],
              progress: bool) -> tuple[dict[Feature, str], dict]:
    """LLM explanations of the features in ``todo`` (with their contexts), one file each, reused on rerun."""
    info: dict = {"url": settings.llm_url, "n": 0, "failed": 0, "note": ""}
    if not settings.llm_url or not todo:
        return {}, info
    from refusalscope.explain.chat import ChatClient, explain_with_llm

    client = ChatClient(settings.llm_url, model=settings.llm_model, timeout=settings.http_timeout,
                        retries=settings.retries, backoff=settings.backoff)
    out: dict[Feature, str] = {}
    for f, contexts in tqdm(sorted(todo.items()), desc="llm explanations", unit="feature", disable=not progress,
                            leave=False):
        name = f"{OUT}/llm/L{f.layer}_{f.latent}.json"
        key = digest({"url": settings.llm_url, "model": settings.llm_model,
                      "contexts": [c.model_dump(mode="json") for c in contexts]})
        if finished.store.exists(name) and finished.store.read_json(name).get("digest") == key:
            out[f] = finished.store.read_json(name)["text"]
            continue
        try:
            text = explain_with_llm(client, contexts)
        except Unreachable as e:
            info["note"] = f"LLM explainer unavailable ({e}); the remaining features get the fallback line"
            log.warning(info["note"])
            break
        except EndpointError as e:
            info["failed"] += 1
            log.warning("LLM explanation of %s failed (%s); using the fallback line", f, e)
            continue
        finished.store.write_json(name, {"feature": str(f), "digest": key, "model": client.model, "text": text})
        out[f] = text
    info["n"] = len(out)
    info["model"] = client.model if out else settings.llm_model
    return out, info


# ---- the analysis -----------------------------------------------------------------------------------------------

def run(finished: FinishedRun, settings: ExplainSettings, progress: bool) -> dict:
    features = features_to_explain(finished, settings.limit)
    if not features:
        raise RefusalScopeError(f"{finished.store.root} holds no features to explain (no Stage-1 features)")
    themes = semantics.load_themes(settings.themes)  # bad themes file: fail before any work
    if settings.llm_url:
        from refusalscope.explain.chat import endpoint

        endpoint(settings.llm_url, "chat/completions")
    prompts = corpus_prompts(finished, settings) if settings.corpus else []
    if settings.corpus and not prompts:
        raise RefusalScopeError(f"the context corpus ({', '.join(settings.corpus)}) holds only prompts the run "
                                "evaluated; choose other sets with --corpus")
    feats = list(features)
    sources, note = neuronpedia_sources(finished, settings, sorted({f.layer for f in feats}))
    contexts, pass_info = local_contexts(finished, settings, feats, prompts, progress)
    np_text, np_contexts, np_info = neuronpedia_texts(settings, feats, sources, progress)
    np_info["note"] = np_info["note"] or note
    contexts = {f: contexts.get(f) or np_contexts.get(f, []) for f in feats}
    todo = {f: contexts[f] for f in feats if f not in np_text and contexts[f]}
    llm_text, llm_info = llm_texts(finished, settings, todo, progress)

    records: dict[Feature, Explanation] = {}
    for f in feats:
        if f in np_text:
            text, source = np_text[f], "neuronpedia"
        elif f in llm_text:
            text, source = llm_text[f], "llm"
        else:
            text, source = fallback.describe(contexts[f]), "local-fallback"
        records[f] = Explanation(feature=str(f), text=text, source=source, groups=features[f], contexts=contexts[f])

    store = finished.store
    store.write_json(EXPLANATIONS_JSON, explanations_json(records))
    store.write_table(EXPLANATIONS_TABLE, explanations_table(records))
    texts = {str(f): r.text for f, r in records.items()}
    terms = semantics.top_terms(list(texts.values()), settings.top_terms)
    store.write_table(f"{OUT}/top_terms.parquet", terms)
    assigned = semantics.assign_themes(texts, themes)
    store.write_table(f"{OUT}/feature_themes.parquet", assigned)
    theme_table = semantics.theme_table(assigned, list(themes))
    store.write_table(f"{OUT}/themes.parquet", theme_table)

    by_source = {s: sum(r.source == s for r in records.values()) for s in ("neuronpedia", "llm", "local-fallback")}
    by_group: dict[str, int] = {}
    for g in features.values():
        for name in g:
            by_group[name] = by_group.get(name, 0) + 1
    return {
        "n_features": len(records), "by_source": by_source, "by_group": by_group,
        "n_without_contexts": sum(not r.contexts for r in records.values()),
        "contexts": pass_info,
        "neuronpedia": {**np_info, "n_missing": len(np_info["missing"])},
        "llm": llm_info,
        "top_terms": terms.head(10).to_dict("records"),
        "themes": {row.theme: int(row.n_features) for row in theme_table.itertuples()},
        # the packaged file by name, not by where this machine installed it (a run directory names no such path)
        "themes_file": str(settings.themes) if settings.themes else "packaged: refusalscope/explain/themes.toml",
    }


def summary_lines(summary: dict) -> list[str]:
    src = summary["by_source"]
    lines = [f"{summary['n_features']} features explained: {src['neuronpedia']} by Neuronpedia, {src['llm']} by the "
             f"LLM, {src['local-fallback']} by the local fallback line"]
    c = summary["contexts"]
    if c.get("n_texts"):
        how = "reused from contexts.json" if c.get("reused") else (
            f"{c['seconds']:.1f} s on {c.get('device', '?')} (+{c.get('load_seconds', 0):.1f} s loading)")
        lines.append(f"top contexts: one pass over {c['n_texts']} corpus texts ({c['n_tokens']} tokens; "
                     f"{', '.join(c['corpus'])}), {how}; {summary['n_without_contexts']} features never fired")
    np_ = summary["neuronpedia"]
    if np_.get("note"):
        lines.append(f"neuronpedia: {np_['note']}")
    if np_.get("n_missing"):
        lines.append(f"neuronpedia: {np_['n_missing']} explanations missing (listed in summary.json)")
    if summary["llm"].get("note"):
        lines.append(f"llm: {summary['llm']['note']}")
    terms = ", ".join(f"{t['term']} ({t['count']})" for t in summary["top_terms"])
    if terms:
        lines.append(f"top terms: {terms}")
    top_themes = sorted(summary["themes"].items(), key=lambda kv: -kv[1])[:6]
    lines.append("themes: " + ", ".join(f"{k} {v}" for k, v in top_themes))
    return lines
