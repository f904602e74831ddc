"""``analyze explain`` on a finished tiny run: every feature gets a record (Neuronpedia, LLM or fallback) with its
top contexts, the files the report reads, reuse on rerun, clear fallbacks, and no API key in any file or log."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from helpers import MockServer, Reply, chat_reply, free_port_url
from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.analysis.registry import run_analysis
from refusalscope.config import ExplainSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.explain import semantics
from refusalscope.explain.run import summary_lines

NP_KEY, LLM_KEY = "np-key-planted-0c0ffee", "llm-key-planted-beef42"


def _settings(run, tmp_path, **kw):
    base = dict(run=run, device="cpu", batch_size=4, corpus=["harmful_train", "harmless_test"], n_contexts=3,
                window_before=4, window_after=1, cache_dir=str(tmp_path / "np-cache"), retries=1, backoff=0.0,
                http_timeout=5.0)
    return ExplainSettings(**{**base, **kw})


def _explanations(run):
    return json.loads((run / "analyses/explain/explanations.json").read_text())["features"]


def test_every_feature_gets_a_fallback_record_with_local_contexts(finished_run, tmp_path):
    run, judge = finished_run
    expected = FinishedRun(run).pipeline_features()
    s = run_analysis("explain", _settings(run, tmp_path), progress=False, judge=judge)
    feats = _explanations(run)
    assert set(feats) == {str(f) for f in expected}
    for f, groups in expected.items():
        rec = feats[str(f)]
        assert rec["feature"] == str(f) and rec["groups"] == groups and rec["source"] == "local-fallback"
        assert rec["text"].startswith("fires on ") or rec["text"].startswith("never fired")
        assert len(rec["contexts"]) <= 3
        for c in rec["contexts"]:
            assert c["tokens"][c["top_index"]] == c["top_token"] and c["top_value"] > 0
            assert c["prompt"].startswith(("Tell me how to pick lock number", "Give me a recipe for soup number"))
    assert sum(bool(r["contexts"]) for r in feats.values()) >= len(feats) // 2
    assert s["by_source"] == {"neuronpedia": 0, "llm": 0, "local-fallback": len(feats)}
    assert s["contexts"]["n_texts"] == 20 and not s["contexts"]["reused"]  # 8 harmful_train + 12 harmless_test
    assert "no Neuronpedia ids" in s["neuronpedia"]["note"]
    table = pd.read_parquet(run / "analyses/explain/explanations.parquet")
    assert len(table) == len(feats) and set(table["source"]) == {"local-fallback"}
    terms = pd.read_parquet(run / "analyses/explain/top_terms.parquet")
    assert list(terms.columns) == ["term", "count", "share"] and len(terms) <= 30
    themes = pd.read_parquet(run / "analyses/explain/themes.parquet")
    assert list(themes.columns) == ["theme", "n_features", "share", "n_primary", "examples"]
    assert themes["n_primary"].sum() == len(feats)
    assert len(pd.read_parquet(run / "analyses/explain/feature_themes.parquet")) == len(feats)
    stored = (run / "analyses/explain/summary.json").read_text()
    assert json.loads(stored)["n_features"] == len(feats)
    assert json.loads(stored)["themes_file"].startswith("packaged") and str(semantics.DEFAULT_THEMES) not in stored
    lines = summary_lines(s)
    assert lines[0].startswith(f"{len(feats)} features explained") and any("one pass over 20" in x for x in lines)

    again = run_analysis("explain", _settings(run, tmp_path), progress=False, judge=judge)
    assert again["contexts"]["reused"] and _explanations(run) == feats  # the pass is not repeated
    other = run_analysis("explain", _settings(run, tmp_path, n_contexts=1), progress=False, judge=judge)
    assert not other["contexts"]["reused"]
    assert all(len(r["contexts"]) <= 1 for r in _explanations(run).values())


def test_taxonomy_features_and_limit(finished_run, tmp_path):
    run, judge = finished_run
    finished = FinishedRun(run)
    first = finished.records[0]
    last_only = sorted(set(finished.pipeline_features()) - set(first.stage1.features))[-1]
    # the taxonomy analysis' table: its random features, and pipeline features (whose groups we know)
    (run / "analyses/taxonomy").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"feature": ["L2/7", "L0/1", str(last_only)], "source": ["random", "random", "pipeline"],
                  "group": ["random_active", "random_inactive", "stage1,stage2"]}).to_parquet(
        run / "analyses/taxonomy/features.parquet")
    run_analysis("explain", _settings(run, tmp_path, corpus=["harmless_test"]), progress=False, judge=judge)
    feats = _explanations(run)
    assert "random_active" in feats["L2/7"]["groups"] and "random_inactive" in feats["L0/1"]["groups"]
    assert feats[str(last_only)]["groups"] == finished.pipeline_features()[last_only]
    run_analysis("explain", _settings(run, tmp_path, corpus=["harmless_test"], limit=1), progress=False, judge=judge)
    limited = set(_explanations(run))
    assert {str(f) for f in first.stage1.features} <= limited and "L2/7" in limited
    assert limited <= set(feats)


def test_llm_explains_features_and_is_reused(finished_run, tmp_path, monkeypatch):
    run, judge = finished_run
    monkeypatch.setenv("REFUSALSCOPE_LLM_API_KEY", LLM_KEY)
    with MockServer(lambda req: chat_reply("Weapons and explosives.")) as srv:
        s = run_analysis("explain", _settings(run, tmp_path, llm_url=srv.url, llm_model="tiny"), progress=False,
                         judge=judge)
        n = len(srv.requests)
        feats = _explanations(run)
        with_ctx = [f for f, r in feats.items() if r["contexts"]]
        assert n == len(with_ctx) and s["llm"]["n"] == n
        assert all(r["source"] == "llm" and r["text"] == "Weapons and explosives" for r in feats.values()
                   if r["contexts"])
        assert all(r["source"] == "local-fallback" for r in feats.values() if not r["contexts"])
        assert {r["headers"].get("authorization") for r in srv.requests} == {f"Bearer {LLM_KEY}"}
        run_analysis("explain", _settings(run, tmp_path, llm_url=srv.url, llm_model="tiny"), progress=False,
                     judge=judge)
        assert len(srv.requests) == n  # every explanation came from analyses/explain/llm/
    themes = pd.read_parquet(run / "analyses/explain/themes.parquet").set_index("theme")
    assert themes.loc["violence-weapons", "n_features"] >= len(with_ctx)
    assert pd.read_parquet(run / "analyses/explain/top_terms.parquet")["term"].tolist()[:2] == ["explosives",
                                                                                             "weapons"]


def test_llm_down_or_malformed_falls_back_with_a_clear_note(finished_run, tmp_path, caplog):
    run, judge = finished_run
    s = run_analysis("explain", _settings(run, tmp_path, llm_url=free_port_url(), llm_model="m"), progress=False,
                     judge=judge)
    assert s["by_source"]["llm"] == 0 and "LLM explainer unavailable" in s["llm"]["note"]
    assert any(line.startswith("llm: LLM explainer unavailable") for line in summary_lines(s))
    with MockServer(lambda req: Reply(body=b"{broken")) as srv:
        s = run_analysis("explain", _settings(run, tmp_path, llm_url=srv.url, llm_model="m"), progress=False,
                         judge=judge)
    assert s["llm"]["failed"] > 0 and s["by_source"]["llm"] == 0
    assert "malformed JSON" in caplog.text


def _neuronpedia(state):
    def handler(req):
        parts = req["path"].strip("/").split("/")
        state.append(req["headers"].get("x-api-key"))
        if parts[:2] == ["api", "feature"] and parts[2] == "tiny-model":
            index = int(parts[4])
            if index % 2 == 0:
                return Reply(body={"explanations": [{"description": f"planted explanation {index} about cats"}],
                                   "activations": []})
        return Reply(404)
    return handler


def test_neuronpedia_first_then_fallback_and_no_key_anywhere(finished_run, tmp_path, monkeypatch, caplog):
    run, judge = finished_run
    monkeypatch.setenv("NEURONPEDIA_API_KEY", NP_KEY)
    monkeypatch.setenv("REFUSALSCOPE_LLM_API_KEY", LLM_KEY)
    caplog.set_level(logging.DEBUG)
    keys: list = []
    with MockServer(_neuronpedia(keys)) as np_srv, MockServer(lambda req: chat_reply("a planted phrase")) as llm:
        settings = _settings(run, tmp_path, neuronpedia="api", neuronpedia_source="tiny-model/{layer}-res",
                             neuronpedia_url=np_srv.url, llm_url=llm.url, llm_model="m")
        s = run_analysis("explain", settings, progress=False, judge=judge)
        feats = _explanations(run)
        for f, r in feats.items():
            latent = int(f.split("/")[1])
            if latent % 2 == 0:
                assert r["source"] == "neuronpedia" and r["text"] == f"planted explanation {latent} about cats"
            else:
                assert r["source"] in ("llm", "local-fallback")
        assert s["neuronpedia"]["n_missing"] == sum(int(f.split("/")[1]) % 2 for f in feats)
        assert s["neuronpedia"]["used"][0]["via"] == "api"
        assert set(keys) == {NP_KEY}
        assert "Neuronpedia has no explanation for" in caplog.text
        # offline: the same answers from the cache, without the server
        off = run_analysis("explain", settings.model_copy(update={"offline": True, "neuronpedia_url":
                                                                  free_port_url()}), progress=False, judge=judge)
        assert off["by_source"]["neuronpedia"] == s["by_source"]["neuronpedia"]
    themes = pd.read_parquet(run / "analyses/explain/top_terms.parquet")
    assert "cats" in themes["term"].tolist()
    for root in (run, tmp_path / "np-cache"):
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert NP_KEY.encode() not in data and LLM_KEY.encode() not in data, p
    assert NP_KEY not in caplog.text and LLM_KEY not in caplog.text


def test_neuronpedia_exports_mode(finished_run, tmp_path):
    import gzip

    run, judge = finished_run
    rows = [{"index": str(i), "description": f"exported explanation {i}"} for i in range(0, 48, 3)]
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())

    def handler(req):
        if req["query"].get("list-type") == "2":
            prefix = req["query"]["prefix"]
            return Reply(body=(f"<ListBucketResult><Contents><Key>{prefix}batch-0.jsonl.gz</Key></Contents>"
                               "<IsTruncated>false</IsTruncated></ListBucketResult>").encode())
        if req["path"].endswith("batch-0.jsonl.gz"):
            return Reply(body=blob)
        return Reply(404)
    with MockServer(handler) as srv:
        s = run_analysis("explain", _settings(run, tmp_path, neuronpedia="exports", neuronpedia_source="t/{layer}-r",
                                              neuronpedia_exports_url=srv.url), progress=False, judge=judge)
    feats = _explanations(run)
    for f, r in feats.items():
        latent = int(f.split("/")[1])
        assert (r["source"] == "neuronpedia") is (latent % 3 == 0)
    assert {u["via"] for u in s["neuronpedia"]["used"]} == {"exports"}


def test_bad_options_fail_before_any_work(finished_run, tmp_path):
    run, judge = finished_run
    with pytest.raises(RefusalScopeError, match="--neuronpedia api: the run's SAE set .* no Neuronpedia ids"):
        run_analysis("explain", _settings(run, tmp_path, neuronpedia="api"), progress=False, judge=judge)
    with pytest.raises(RefusalScopeError, match="themes file not found"):
        run_analysis("explain", _settings(run, tmp_path, themes=str(tmp_path / "none.toml")), progress=False,
                     judge=judge)
    with pytest.raises(RefusalScopeError, match="not an http"):
        run_analysis("explain", _settings(run, tmp_path, llm_url="localhost:8080"), progress=False, judge=judge)
    assert not (run / "analyses/explain/contexts.json").exists()


def test_cli(finished_run, tmp_path, capsys):
    from refusalscope.cli import main

    run, _ = finished_run
    rc = main(["analyze", "explain", "--run", str(run), "--device", "cpu", "--corpus", "harmless_test",
               "--neuronpedia", "off", "--n-contexts", "2", "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0 and "features explained" in out and "analyses/explain" in out
    assert main(["analyze", "explain", "--run", str(run), "--themes", str(tmp_path / "no.toml")]) == 2
    assert "themes file not found" in capsys.readouterr().err


def test_no_corpus_means_no_model_pass(finished_run, tmp_path, monkeypatch):
    run, judge = finished_run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(FinishedRun, "context", no_model)
    s = run_analysis("explain", _settings(run, tmp_path, corpus=[], neuronpedia="off"), progress=False, judge=judge)
    feats = _explanations(run)
    assert s["contexts"]["n_texts"] == 0 and s["n_without_contexts"] == len(feats)
    assert {r["text"] for r in feats.values()} == {"never fired on the context corpus (local contexts)"}
