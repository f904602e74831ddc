"""The annotation web app (paper, Fig. 7): ``refusalscope annotate RUN [--port P] [--host H]``.

An annotator enters a name, then sees one sampled feature at a time (its explanation and top-5 activating contexts,
the top token highlighted with its value), ticks CoCoNot categories or 'None', and moves on. Each answer is stored
when given (``store.AnnotationStore``), so closing the browser loses nothing and a returning name resumes at its
first unanswered feature. ``/accuracy`` scores the majority vote against the activation-based labels,
``/export.csv`` exports every answer, ``/api/next`` and ``/api/answer`` are the same flow as JSON.
Flask renders every run-derived string through Jinja2's autoescaping; pages carry a CSP that allows no script.
"""

from __future__ import annotations

import io
import ipaddress
from datetime import datetime, timezone
from pathlib import Path

from flask import Flask, Response, jsonify, redirect, render_template, request, url_for

from refusalscope.annotate import inputs
from refusalscope.annotate.sampling import count_by, sample_features
from refusalscope.annotate.scoring import DEFINITIONS, agreement, percent
from refusalscope.annotate.store import FILE, AnnotationError, AnnotationStore, clean_name
from refusalscope.errors import RefusalScopeError

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; base-uri 'none'"
SAMPLE_OPTIONS = ("n_pipeline", "n_active", "n_inactive", "seed", "order")


def open_store(settings) -> tuple[AnnotationStore, str]:
    """The run's annotation store, its sample drawn and stored on first use; returns (store, a note for the user)."""
    run = Path(settings.run)
    if not run.is_dir():
        raise RefusalScopeError(f"run directory {run} does not exist")
    features = inputs.read_features(run)
    if not (run / inputs.EXPLANATIONS).is_file():
        raise RefusalScopeError(f"{run} has no explanations ({inputs.EXPLANATIONS}); run 'refusalscope analyze "
                                f"explain --run {run}' first: annotators judge the explanations and top contexts")
    store = AnnotationStore(run / FILE)
    options = {k: getattr(settings, k) for k in SAMPLE_OPTIONS}
    if store.items():
        old = store.options
        changed = [k for k in SAMPLE_OPTIONS if k in old and old[k] != options[k]]
        note = (f"kept the stored sample of {len(store.items())} features"
                + (f" (drawn with {', '.join(f'{k}={old[k]}' for k in changed)}; delete {store.path} to redraw)"
                   if changed else ""))
        return store, note
    items = sample_features(features, settings.n_pipeline, settings.n_active, settings.n_inactive, settings.seed)
    if not items:
        raise RefusalScopeError(f"{run}/{inputs.FEATURES} holds no features to annotate")
    store.initialise(items, inputs.categories(run, features, settings.data_dir), options)
    counts = count_by(store.items())
    return store, (f"sampled {len(store.items())} features ({counts['pipeline']} pipeline, {counts['random_active']} "
                   f"random activating, {counts['random_inactive']} random non-activating; seed {settings.seed})")


def create_app(settings, store: AnnotationStore | None = None) -> Flask:
    """The Flask app over ``settings.run`` (options: ``config.AnnotateSettings``)."""
    run = Path(settings.run)
    if store is None:
        store, _ = open_store(settings)
    truth = inputs.activation_labels(inputs.read_features(run))
    explanations = inputs.read_explanations(run)
    app = Flask(__name__)
    app.jinja_env.autoescape = True  # .html templates are autoescaped anyway; say so for every template
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def feature_view(name: str) -> dict:
        done, feature = store.next_feature(name)
        view = {"annotator": name, "done": done, "total": len(store.items()), "feature": feature,
                "categories": store.categories}
        if feature is not None:
            record = explanations.get(feature) or {}
            view.update(token=store.token(name, feature), explanation=str(record.get("text") or ""),
                        contexts=inputs.display_contexts(record, 5))
        return view

    def page_error(err: AnnotationError, name: str | None):
        view = {"message": err.message, "annotator": name}
        return render_template("message.html", **view), err.status

    def start_page(err: AnnotationError | None = None):
        """The start page, with the reason a name was refused (and its status) when there is one."""
        page = render_template("start.html", progress=store.progress(), message=err.message if err else None)
        return (page, err.status) if err else page

    @app.get("/")
    def start():
        return start_page()

    @app.post("/start")
    def begin():
        try:
            name = store.register(request.form.get("name", ""))
        except AnnotationError as e:
            return start_page(e)
        return redirect(url_for("annotate", annotator=name), 303)

    @app.get("/annotate")
    def annotate():
        try:
            name = store.annotator(request.args.get("annotator", ""))
        except AnnotationError as e:
            return start_page(e)
        return render_template("annotate.html", **feature_view(name))

    @app.post("/answer")
    def answer():
        form = request.form
        name = form.get("annotator", "")
        try:
            store.submit(name, form.get("feature", ""), form.get("token", ""), form.getlist("category"),
                         form.get("none") == "1")
        except AnnotationError as e:
            return page_error(e, name if store.known(name) else None)
        return redirect(url_for("annotate", annotator=clean_name(name)), 303)

    @app.post("/api/start")
    def api_start():
        try:
            name = store.register((request.get_json(silent=True) or {}).get("name", ""))
        except AnnotationError as e:
            return jsonify(error=e.message), e.status
        done, _ = store.next_feature(name)
        return jsonify(annotator=name, done=done, total=len(store.items()))

    @app.get("/api/next")
    def api_next():
        try:
            name = store.annotator(request.args.get("annotator", ""))
        except AnnotationError as e:
            return jsonify(error=e.message), e.status
        view = feature_view(name)
        view["contexts"] = [{"tokens": [t for t, _ in c["tokens"]], "top_token": c["top_token"],
                             "top_value": c["top_value"]} for c in view.get("contexts", [])]
        return jsonify(view)

    @app.post("/api/answer")
    def api_answer():
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return jsonify(error="send a JSON object {annotator, feature, token, categories, none}"), 400
        cats = data.get("categories") or []
        if not isinstance(cats, list):
            return jsonify(error="categories is a list of category names"), 400
        try:
            store.submit(str(data.get("annotator", "")), str(data.get("feature", "")), str(data.get("token", "")),
                         cats, bool(data.get("none")))
        except AnnotationError as e:
            return jsonify(error=e.message), e.status
        done, feature = store.next_feature(clean_name(data["annotator"]))
        return jsonify(ok=True, done=done, next=feature)

    @app.get("/accuracy")
    def accuracy():
        result = agreement(store.answers(), dict(store.items()), truth, votes=settings.votes,
                           min_annotators=settings.min_annotators)
        return render_template("accuracy.html", result=result, percent=percent, definitions=DEFINITIONS,
                               progress=store.progress(), total=len(store.items()))

    @app.get("/export.csv")
    def export():
        return Response(export_csv(store), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=annotations.csv"})

    return app


def export_csv(store: AnnotationStore) -> str:
    """Every answer as CSV: annotator, feature, source, categories (';'-joined, 'None' when empty), answered (UTC)."""
    frame = store.answers()
    frame["categories"] = [";".join(c) if c else "None" for c in frame["categories"]]
    frame["answered"] = [datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
                         for t in frame["answered"]]
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings, say=print) -> None:
    """Serve the app until interrupted (werkzeug's threaded server: one thread a request)."""
    from werkzeug.serving import make_server

    store, note = open_store(settings)
    app = create_app(settings, store)
    try:
        server = make_server(settings.host, settings.port, app, threaded=True)
    except OSError as e:
        raise RefusalScopeError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror or e})") from None
    except SystemExit:  # werkzeug explains a taken port on stderr, then exits
        raise RefusalScopeError(f"cannot listen on {settings.host}:{settings.port} (address in use; pick another "
                                "--port, or 0 for any free one)") from None
    say(note)
    if not is_loopback(settings.host):
        say(f"warning: listening on {settings.host}, reachable from other machines; the app has no login")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    say(f"annotation app of {settings.run}: http://{host}:{server.server_port}/ (Ctrl-C stops; answers are in "
        f"{store.path})")
    try:
        server.serve_forever()
    finally:
        server.server_close()
