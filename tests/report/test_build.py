import re

from helpers import INJECT_IMG, INJECT_SCRIPT
from refusalscope.annotate.store import AnnotationStore
from refusalscope.cli import main
from refusalscope.config import ReportSettings
from refusalscope.report.build import build_report

ANALYSES = ["hydra", "controls", "ce", "clamp", "taxonomy", "explain"]
ALL = ["run", "saes", "direction", "stage1", "stage2", "stage3", *ANALYSES, "annotation", "prompts"]


def _sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([\w-]+)" data-status="(\w+)">', html))


def _assert_self_contained(html: str):
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from elsewhere
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html


def test_report_of_a_run_without_analyses(finished_run):
    run, _ = finished_run
    path, sections = build_report(ReportSettings(run=run))
    assert path == run / "report.html"
    html = path.read_text()
    status = _sections(html)
    assert list(status) == ALL
    for key in ["run", "direction", "stage1", "stage2", "stage3", "prompts"]:
        assert status[key] == "present", key
    # given an absolute path, the report (inside the run, which moves between machines) names the run by its name
    for name in ANALYSES:
        assert status[name] == "missing"
        assert f"not in this run: run `refusalscope analyze {name} --run {run.name}`" in html
    assert f"not in this run: run `refusalscope annotate {run.name}`" in html
    assert str(run.parent) not in html
    _assert_self_contained(html)
    assert "by the substring judge" in html  # every jailbreak number names its judge


def test_a_relative_run_path_is_kept_in_the_suggested_commands(finished_run, monkeypatch):
    run, _ = finished_run
    monkeypatch.chdir(run.parent.parent)
    relative = run.relative_to(run.parent.parent)
    path, _ = build_report(ReportSettings(run=relative))
    html = path.read_text()
    assert f"not in this run: run `refusalscope analyze hydra --run {relative}`" in html
    assert f"Run directory <code>{relative}</code>" in html
    assert str(run.parent) not in html


def test_report_with_every_section_and_escaped_run_strings(analysed_run):
    run, _, info = analysed_run
    store = AnnotationStore(run / "annotations.sqlite")
    items = [(f, "pipeline") for f in sorted(info["labels"])[:4]]
    store.initialise(items, ["misinformation", "wildchats", *sorted({c for v in info["labels"].values() for c in v})],
                     {"seed": 0, "order": "shared"})
    for name in ("a", "b", "c"):
        store.register(name)
        for i, (feature, _) in enumerate(items):
            truth = info["labels"][feature]
            cats = truth if (name != "c" and i < 2) else ["misinformation", "wildchats"]  # 2 exact of 4 (or more)
            store.submit(name, feature, store.token(name, feature), cats if cats else [], not cats)
    path, sections = build_report(ReportSettings(run=run, out=run / "out" / "r.html"))
    html = path.read_text()
    assert path == run / "out" / "r.html"
    assert set(_sections(html).values()) == {"present"}, _sections(html)
    assert not any(s.notes for s in sections), [s.notes for s in sections]
    _assert_self_contained(html)
    # the injected prompt, completion and explanation are text, never markup
    assert INJECT_SCRIPT not in html and INJECT_IMG not in html and "onerror=\"" not in html
    assert html.count("&lt;script&gt;window.__pwned = 1&lt;/script&gt;") >= 3
    # the annotation section scores the planted answers as the app does
    exact = sum(1 for i, (f, _) in enumerate(items)
                if i < 2 or set(info["labels"][f]) == {"misinformation", "wildchats"})
    assert f"<dt>exact</dt><dd>{100 * exact / 4:.1f}%</dd>" in html
    for figure in ("graph.png", "obrien.png", "clamp.png", "taxonomy.png", "stages.png", "stage3.png"):
        assert figure in html


def test_an_unreadable_file_is_a_note_not_a_failed_report(analysed_run):
    run, _, _ = analysed_run
    (run / "analyses" / "ce" / "ce_table.parquet").write_bytes(b"not parquet")
    (run / "analyses" / "hydra" / "summary.json").write_text("{broken")
    path, sections = build_report(ReportSettings(run=run))
    by_key = {s.key: s for s in sections}
    assert any("ce_table.parquet could not be read" in n for n in by_key["ce"].notes)
    assert any("summary.json could not be read" in n for n in by_key["hydra"].notes)
    assert "ce_table.parquet could not be read" in path.read_text()


def test_cli(finished_run, capsys, tmp_path):
    run, _ = finished_run
    assert main(["report", str(run), "--max-rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "not in this run: hydra" in out and str(run / "report.html") in out
    assert "1 of 3 rows shown" in (run / "report.html").read_text()
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file()
    assert main(["report", str(run), "--run", str(tmp_path)]) == 2
    assert "two run directories" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(run), "--max-rows", "0x"]) == 2
    assert "--max-rows" in capsys.readouterr().err
