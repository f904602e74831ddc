import csv
import io
import shutil

import pytest

from helpers import INJECT_IMG, INJECT_SCRIPT, INJECTION
from refusalscope.annotate.app import create_app, open_store
from refusalscope.cli import main
from refusalscope.config import AnnotateSettings
from refusalscope.errors import RefusalScopeError


@pytest.fixture
def app_run(analysed_run):
    run, _, info = analysed_run
    settings = AnnotateSettings(run=run, n_pipeline=10, n_active=4, n_inactive=4, votes=2, min_annotators=3)
    store, note = open_store(settings)
    app = create_app(settings, store)
    app.testing = True
    return app.test_client(), store, info, settings


def _start(client, name):
    r = client.post("/start", data={"name": name})
    assert r.status_code == 303 and "/annotate?annotator=" in r.headers["Location"]


def _form(store, name, cats=("misinformation",), none=False, **override):
    _, feature = store.next_feature(name)
    data = {"annotator": name, "feature": feature, "token": store.token(name, feature), "category": list(cats)}
    if none:
        data["none"] = "1"
    data.update(override)
    return data


def test_sample_is_drawn_once_with_the_taxonomy_categories(app_run):
    client, store, info, settings = app_run
    counts = {s: sum(1 for _, x in store.items() if x == s) for s in ("pipeline", "random_active", "random_inactive")}
    assert counts == {"pipeline": 10, "random_active": 4, "random_inactive": 4}
    assert store.categories[:2] == ["copyright violations", "dangerous or sensitive topics"]
    store2, note = open_store(settings.model_copy(update={"n_pipeline": 3}))
    assert store2.items() == store.items() and "kept the stored sample" in note and "n_pipeline=10" in note


def test_missing_taxonomy_or_explanations_is_one_clear_error(finished_run, tmp_path, capsys):
    run, _ = finished_run
    with pytest.raises(RefusalScopeError, match="analyze taxonomy"):
        open_store(AnnotateSettings(run=run))
    assert main(["annotate", str(run), "--port", "0"]) == 2
    assert "analyze taxonomy" in capsys.readouterr().err


def test_explanations_are_required(analysed_run):
    run, _, _ = analysed_run
    shutil.rmtree(run / "analyses" / "explain")
    with pytest.raises(RefusalScopeError, match="analyze explain"):
        open_store(AnnotateSettings(run=run))


def test_the_annotation_flow_by_form(app_run):
    client, store, info, _ = app_run
    r = client.post("/start", data={"name": "  "})
    assert r.status_code == 400 and b"enter your name" in r.data
    _start(client, "alice")
    page = client.get("/annotate?annotator=alice")
    html = page.data.decode()
    _, feature = store.next_feature("alice")
    assert page.status_code == 200 and f'<span id="feature">{feature}</span>' in html
    assert "0 of 18" in html and 'class="tok top"' in html and "top token" in html
    assert all(c in html for c in store.categories)
    assert "random_active" not in html and "random_inactive" not in html and "pipeline" not in html  # source hidden
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    r = client.post("/answer", data=_form(store, "alice", ("misinformation", "wildchats")))
    assert r.status_code == 303
    assert list(store.answers()["categories"]) == [["misinformation", "wildchats"]]
    assert "1 of 18" in client.get("/annotate?annotator=alice").data.decode()


@pytest.mark.parametrize("override,status,message", [
    ({"feature": "L99/1"}, 400, "unknown feature"),
    ({"category": ["no such category"]}, 400, "unknown category"),
    ({"category": []}, 400, "at least one category"),
    ({"none": "1"}, 400, "not both"),
    ({"token": "x"}, 409, "stale"),
])
def test_bad_form_submits_show_a_message_and_store_nothing(app_run, override, status, message):
    client, store, _, _ = app_run
    _start(client, "alice")
    r = client.post("/answer", data=_form(store, "alice", **override))
    assert r.status_code == status and message in r.data.decode() and b"Back to your next feature" in r.data
    assert len(store.answers()) == 0


def test_duplicate_and_out_of_order_submits(app_run):
    client, store, _, _ = app_run
    _start(client, "alice")
    form = _form(store, "alice")
    assert client.post("/answer", data=form).status_code == 303
    dup = client.post("/answer", data={**form, "category": ["wildchats"]})
    assert dup.status_code == 409 and b"already answered" in dup.data
    later = store.order("alice")[5]
    r = client.post("/answer", data={**form, "feature": later, "token": store.token("alice", later)})
    assert r.status_code == 409 and b"not your next feature" in r.data
    assert list(store.answers()["categories"]) == [["misinformation"]]
    assert client.get("/annotate?annotator=nobody").status_code == 404


def test_run_strings_are_escaped_in_the_app(analysed_run):
    run, _, info = analysed_run
    settings = AnnotateSettings(run=run, n_pipeline=1000)  # every pipeline feature, the injected one too
    store, _ = open_store(settings)
    client = create_app(settings, store).test_client()
    injected, name = info["injected_feature"], "alice"
    _start(client, name)
    while store.next_feature(name)[1] != injected:
        assert client.post("/answer", data=_form(store, name)).status_code == 303
    html = client.get(f"/annotate?annotator={name}").data.decode()
    assert INJECT_SCRIPT not in html and INJECT_IMG not in html and "<img" not in html
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=&#34;window.__pwned = 2&#34;&gt;" in html
    # an annotator name is run-independent input, escaped the same way
    r = client.post("/start", data={"name": INJECT_IMG})
    assert r.status_code == 303
    assert INJECT_IMG not in client.get("/").data.decode()
    assert client.post("/start", data={"name": INJECTION}).status_code == 400  # over 64 characters


def test_api_export_and_accuracy(app_run):
    client, store, info, _ = app_run
    for name in ("a", "b", "c"):
        assert client.post("/api/start", json={"name": name}).status_code == 200
        for _ in range(len(store.items())):
            nxt = client.get(f"/api/next?annotator={name}").get_json()
            truth = info["labels"][nxt["feature"]]
            # a and b give the activation label, c always ticks 'wildchats': every majority equals the truth
            cats = ["wildchats"] if name == "c" else truth
            r = client.post("/api/answer", json={"annotator": name, "feature": nxt["feature"], "token": nxt["token"],
                                                 "categories": cats, "none": not cats})
            assert r.status_code == 200, r.get_json()
    assert client.get("/api/next?annotator=a").get_json()["feature"] is None
    assert b'id="finished"' in client.get("/annotate?annotator=a").data
    assert client.post("/api/answer", json={"annotator": "a"}).status_code == 400
    assert client.post("/api/answer", data="not json").status_code == 400
    page = client.get("/accuracy").data.decode()
    assert '<td class="big" id="exact-accuracy">100.0%</td>' in page and "Jaccard" in page
    rows = list(csv.DictReader(io.StringIO(client.get("/export.csv").data.decode())))
    assert len(rows) == 3 * len(store.items())
    assert set(rows[0]) == {"annotator", "feature", "source", "categories", "answered"}
    first_c = next(r for r in rows if r["annotator"] == "c")
    assert first_c["categories"] == "wildchats"
    assert any(r["categories"] == "None" for r in rows)


def test_a_busy_port_is_one_clear_error(app_run):
    import socket

    from refusalscope.annotate.app import serve

    _, _, _, settings = app_run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(RefusalScopeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(settings.model_copy(update={"port": port}), say=lambda line: None)
