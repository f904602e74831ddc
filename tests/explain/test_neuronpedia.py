"""The Neuronpedia client against a local server that mimics its feature endpoint and its S3 exports bucket:
explanations and contexts, 404, 429, malformed JSON, the on-disk cache, offline mode, the API key kept secret."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from helpers import MockServer, Reply
from refusalscope.config import ExplainOptions
from refusalscope.explain.client import EndpointError
from refusalscope.explain.neuronpedia import (
    DEFAULT_API,
    DEFAULT_EXPORTS,
    MissingExplanation,
    NeuronpediaClient,
    sources_for_run,
    split_id,
)

KEY = "np-planted-key-5e1f"
MODEL, SOURCE = "gemma-2-2b", "20-gemmascope-res-16k"
FEATURE = {
    "modelId": MODEL, "layer": SOURCE, "index": "7",
    "explanations": [{"description": "", "typeName": "x"},
                     {"description": "refusals to help with weapons", "typeName": "oai_token-act-pair"}],
    "activations": [
        {"tokens": ["How", " to", " build", " a", " bomb"], "values": [0, 0, 1.5, 0.2, 9.0], "maxValue": 9.0,
         "maxValueTokenIndex": 4},
        {"tokens": ["a", " gun", " shop"], "values": [0.1, 4.0, 0.5], "maxValue": 4.0, "maxValueTokenIndex": 1},
        {"tokens": ["bad"], "values": [1.0, 2.0], "maxValue": 2.0},  # tokens and values disagree: skipped
    ],
    "logits": ["big", "payload", "not", "kept"],
}


def _neuronpedia(state: dict):
    def handler(req):
        parts = req["path"].strip("/").split("/")
        if parts[:2] == ["api", "feature"]:
            model, source, index = parts[2:5]
            state["keys"].append(req["headers"].get("x-api-key"))
            if index == "7":
                return Reply(body=FEATURE)
            if index == "8":
                return Reply(body={**FEATURE, "explanations": []})
            if index == "9":
                return Reply(404, b'{"message": "not found"}')
            if index == "10":
                return Reply(body=b"<html>oops")
            if index == "11":
                state["n11"] = state.get("n11", 0) + 1
                return Reply(429, b"slow down", {"Retry-After": "0"}) if state["n11"] == 1 else Reply(body=FEATURE)
        return Reply(404)
    return handler


@pytest.fixture
def server():
    state = {"keys": []}
    with MockServer(_neuronpedia(state)) as srv:
        srv.state = state
        yield srv


def _client(srv, tmp_path, **kw):
    return NeuronpediaClient(tmp_path / "cache", api_url=srv.url, exports_url=srv.url, retries=2, backoff=0.0,
                             timeout=5.0, **kw)


def test_feature_explanation_and_contexts(server, tmp_path):
    f = _client(server, tmp_path).feature(MODEL, SOURCE, 7, n_contexts=5, before=2, after=1)
    assert f.text == "refusals to help with weapons"  # the first non-empty explanation
    assert f.id == f"{MODEL}/{SOURCE}/7"
    assert [c.top_token for c in f.contexts] == [" bomb", " gun"]  # strongest first; the bad record skipped
    bomb = f.contexts[0]
    assert bomb.tokens == [" build", " a", " bomb"] and bomb.top_index == 2 and bomb.top_value == 9.0
    assert bomb.activations == [1.5, 0.2, 9.0]
    gun = f.contexts[1]
    assert gun.tokens == ["a", " gun", " shop"] and gun.top_index == 1
    assert server.requests[0]["path"] == f"/api/feature/{MODEL}/{SOURCE}/7"


def test_missing_explanations_and_unknown_features(server, tmp_path):
    c = _client(server, tmp_path)
    assert c.feature(MODEL, SOURCE, 8).text is None
    assert c.feature(MODEL, SOURCE, 9).text is None  # 404: Neuronpedia has no such feature
    with pytest.raises(EndpointError, match="malformed JSON"):
        c.feature(MODEL, SOURCE, 10)


def test_429_then_success(server, tmp_path):
    assert _client(server, tmp_path).feature(MODEL, SOURCE, 11).text == "refusals to help with weapons"
    assert server.state["n11"] == 2


def test_cache_serves_repeats_and_offline_mode(server, tmp_path):
    c = _client(server, tmp_path)
    c.feature(MODEL, SOURCE, 7)
    c.feature(MODEL, SOURCE, 9)
    n = len(server.requests)
    assert c.feature(MODEL, SOURCE, 7).text == "refusals to help with weapons"
    assert len(server.requests) == n  # from the cache
    cached = json.loads((tmp_path / "cache" / "features" / MODEL / SOURCE / "7.json").read_text())
    assert "logits" not in cached  # only what we read is kept
    off = NeuronpediaClient(tmp_path / "cache", api_url="http://127.0.0.1:9", offline=True)
    assert off.feature(MODEL, SOURCE, 7).text == "refusals to help with weapons"
    assert off.feature(MODEL, SOURCE, 9).text is None  # a cached 404 stays a clear "none"
    with pytest.raises(MissingExplanation, match=rf"{MODEL}/{SOURCE}/123 is not in the cache .*without --offline"):
        off.feature(MODEL, SOURCE, 123)
    assert len(server.requests) == n


def test_damaged_cache_entry_is_fetched_again(server, tmp_path):
    c = _client(server, tmp_path)
    path = tmp_path / "cache" / "features" / MODEL / SOURCE / "7.json"
    path.parent.mkdir(parents=True)
    path.write_text("{truncated")
    assert c.feature(MODEL, SOURCE, 7).text == "refusals to help with weapons"
    assert json.loads(path.read_text())["index"] == "7"


def test_api_key_is_sent_in_the_header_and_never_written_or_logged(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    c = _client(server, tmp_path)
    c.feature(MODEL, SOURCE, 7)
    c.feature(MODEL, SOURCE, 11)
    with pytest.raises(EndpointError) as err:
        c.feature(MODEL, SOURCE, 10)
    assert server.state["keys"] and set(server.state["keys"]) == {KEY}
    assert all(KEY not in r["path"] and KEY not in str(r["query"]) for r in server.requests)
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in caplog.text and KEY not in str(err.value)
    monkeypatch.delenv("NEURONPEDIA_API_KEY")
    _client(server, tmp_path).feature(MODEL, SOURCE, 8)
    assert server.state["keys"][-1] is None  # no key set: no header


# ---- the bulk exports -------------------------------------------------------------------------------------------

def _gz(rows) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


BATCHES = {
    "batch-0.jsonl.gz": _gz([{"modelId": MODEL, "layer": SOURCE, "index": "3", "description": "legal terms"},
                             {"modelId": MODEL, "layer": SOURCE, "index": "3", "description": "a second one"},
                             {"modelId": MODEL, "layer": SOURCE, "index": "4", "description": ""}]),
    "batch-1.jsonl.gz": _gz([{"modelId": MODEL, "layer": SOURCE, "index": 5, "description": "  apologies  "}]),
}


def _listing(keys, truncated=False, token=None) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><Size>1</Size></Contents>" for k in keys)
    more = f"<NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
            f'2006-03-01/"><Name>b</Name>{contents}<IsTruncated>{str(truncated).lower()}</IsTruncated>{more}'
            "</ListBucketResult>").encode()


def _bucket(files, damaged=False):
    prefix = f"v1/{MODEL}/{SOURCE}/explanations/"

    def handler(req):
        if req["path"] == "/" and req["query"].get("list-type") == "2":
            if req["query"].get("prefix") != prefix:
                return Reply(body=_listing([]))
            names = sorted(files)
            if req["query"].get("continuation-token") == "page2":  # two pages, as S3 pages long listings
                return Reply(body=_listing([prefix + n for n in names[1:]]))
            return Reply(body=_listing([prefix + names[0], prefix + "README.txt"], truncated=True, token="page2"))
        name = req["path"].rsplit("/", 1)[-1]
        if req["path"].startswith("/" + prefix) and name in files:
            return Reply(body=b"not gzip" if damaged else files[name])
        return Reply(404)
    return handler


def test_exports_are_listed_downloaded_parsed_and_cached(tmp_path):
    with MockServer(_bucket(BATCHES)) as srv:
        c = _client(srv, tmp_path)
        got = c.export_explanations(MODEL, SOURCE)
        n = len(srv.requests)
        assert got == {3: "legal terms", 5: "apologies"}  # first non-empty per index, both pages
        assert c.explanation_from_exports(MODEL, SOURCE, 5) == "apologies"
        assert c.explanation_from_exports(MODEL, SOURCE, 4) is None
        fresh = _client(srv, tmp_path)  # a new client reads the downloaded files
        assert fresh.export_explanations(MODEL, SOURCE) == got
        assert len(srv.requests) == n
        with pytest.raises(MissingExplanation, match="no explanations for gemma-2-2b/other"):
            c.export_explanations(MODEL, "other")
    off = NeuronpediaClient(tmp_path / "cache", offline=True)
    assert off.explanation_from_exports(MODEL, SOURCE, 3) == "legal terms"
    with pytest.raises(MissingExplanation, match="exports for gemma-2-2b/x-res are not in the cache"):
        off.explanation_from_exports(MODEL, "x-res", 3)


def test_damaged_export_file_is_dropped_with_a_clear_error(tmp_path):
    with MockServer(_bucket(BATCHES, damaged=True)) as srv:
        with pytest.raises(EndpointError, match="export file batch-0.jsonl.gz .* is damaged"):
            _client(srv, tmp_path).export_explanations(MODEL, SOURCE)
    folder = tmp_path / "cache" / "exports" / MODEL / SOURCE / "explanations"
    assert not (folder / "batch-0.jsonl.gz").exists() and not (folder / "manifest.json").exists()


# ---- ids --------------------------------------------------------------------------------------------------------

def test_registry_sets_map_to_neuronpedia_sources():
    assert sources_for_run({"spec": "gemmascope-res-16k"}, [20]) == {20: "gemma-2-2b/20-gemmascope-res-16k"}
    assert sources_for_run({"spec": "llamascope-res-128k"}, [3]) == {3: "llama3.1-8b/3-llamascope-res-131k"}
    assert sources_for_run({"spec": "/runs/x/saes"}, [3]) == {}  # our own SAEs: Neuronpedia has none
    assert sources_for_run({"spec": "/runs/x/saes"}, [3, 4], "qwen/{layer}-res") == {3: "qwen/3-res", 4: "qwen/4-res"}
    # a saelens:RELEASE:ID set: the ids recorded from the SAEs' SAELens metadata (saes.json "neuronpedia")
    recorded = {"spec": "saelens:rel:l{layer}", "neuronpedia": {"3": "m/3-src", "4": "m/4-src"}}
    assert sources_for_run(recorded, [3, 4]) == {3: "m/3-src", 4: "m/4-src"}
    assert sources_for_run(recorded, [3, 5]) == {}  # a layer it does not name: none rather than a partial map
    assert sources_for_run(recorded, [3], "qwen/{layer}-res") == {3: "qwen/3-res"}  # the flag wins
    with pytest.raises(Exception, match="must contain"):
        sources_for_run({}, [3], "qwen/res")
    assert split_id("gemma-2-2b/20-gemmascope-res-16k") == ("gemma-2-2b", "20-gemmascope-res-16k")
    for bad in ("gemma", "a/b/c", "/x"):
        with pytest.raises(Exception, match="not a Neuronpedia source id"):
            split_id(bad)


def test_option_defaults_are_the_client_defaults():
    opts = ExplainOptions()
    assert (opts.neuronpedia_url, opts.neuronpedia_exports_url) == (DEFAULT_API, DEFAULT_EXPORTS)
