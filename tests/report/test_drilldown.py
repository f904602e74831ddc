import json

from refusalscope.config import ReportSettings
from refusalscope.report.blocks import RunFiles
from refusalscope.report.drilldown import drilldown_section


def test_drilldown_puts_every_stage_side_by_side_with_explained_sets(analysed_run):
    run, _, info = analysed_run
    section = drilldown_section(RunFiles(run), ReportSettings(run=run, max_features=3))
    block = section.blocks[-1]
    assert section.missing is None and block["kind"] == "prompts" and len(block["prompts"]) == 3
    first = block["prompts"][0]
    record = json.loads((run / "prompts" / "00000.json").read_text())
    assert first["prompt"] == record["prompt"]
    labels = [c["label"].split(" (")[0] for c in first["columns"]]
    assert labels == ["baseline", "Stage 1", "Stage 2", "Stage 3"]
    assert first["columns"][0]["completion"].startswith("Sure. <script>")
    assert first["columns"][1]["completion"] == record["stage1"]["completion"]
    sets = {s["label"].split(" (")[0].split(":")[0]: s for s in first["sets"]}
    assert set(sets) == {"Stage 2 set", "Stage 3", "Stage 1 set"}
    st2 = sets["Stage 2 set"]
    assert st2["n"] == len(st2["shown"]) + len(st2["rest"]) and len(st2["shown"]) == 3
    assert all(f["text"] and len(f["contexts"]) == 5 for f in st2["shown"])
    top = st2["shown"][0]["contexts"][0]
    assert sum(is_top for _, is_top in top["tokens"]) == 1
    assert top["top_value"] >= st2["shown"][0]["contexts"][-1]["top_value"]


def test_drilldown_missing_without_prompts(tmp_path):
    section = drilldown_section(RunFiles(tmp_path), ReportSettings(run=tmp_path))
    # the report lives in the run directory, which moves: an absolute run path is named by its directory name
    assert section.missing == f"not in this run: run `refusalscope run --out {tmp_path.name}`"
