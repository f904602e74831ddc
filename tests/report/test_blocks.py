import base64

import numpy as np
import pandas as pd

from refusalscope.report.blocks import RunFiles, cell, flatten, pairs, table


def test_cells():
    assert cell(None) == "" and cell(float("nan")) == "" and cell(True) == "yes" and cell(np.bool_(False)) == "no"
    assert cell(0.123456) == "0.1235" and cell(np.int64(7)) == "7" and cell(np.float32(2.5)) == "2.5"
    assert cell(["L1/2", "L3/4"]) == "L1/2, L3/4"
    assert cell(list(range(15))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 … (+3)"
    assert cell(np.array([1, 2])) == "1, 2"
    assert cell("x" * 500) == "x" * 400 + " …"
    assert cell({"a": 1}) == '{"a": 1}'
    assert cell("<b>") == "<b>"  # raw here: the template escapes


def test_table_and_pairs():
    frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], "c": [0.5, None, 1.0]})
    t = table(frame, "T", columns=["c", "a", "missing"], max_rows=2)
    assert t["columns"] == ["c", "a"] and t["rows"] == [["0.5", "1"], ["", "2"]]
    assert t["truncated"] and t["n_total"] == 3
    assert table(None) is None
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "f"}, skip=["e"]) == [("a.b", "1"), ("a.c.d", "1, 2")]
    assert pairs({"x": 1, "y": 2}, keys=["y"])["items"] == [("y", "2")]
    assert pairs(None) is None and pairs({}) is None


def test_a_table_head_reads_only_its_rows_and_knows_the_whole_count(tmp_path):
    """A preview of a table too large for memory (hydra's edges): the first rows, the whole count from the file's
    metadata, the same block as from the whole table."""
    frame = pd.DataFrame({"a": np.arange(1000), "b": [f"L{i % 7}/{i}" for i in range(1000)]})
    frame.to_parquet(tmp_path / "t.parquet", row_group_size=100)
    files = RunFiles(tmp_path)
    head = files.table("t.parquet", head=5)
    assert len(head) == 5 and head.attrs["n_total"] == 1000
    assert table(head, "T", max_rows=5) == table(files.table("t.parquet"), "T", max_rows=5)
    assert table(head, "T", max_rows=5)["truncated"] and table(head, "T", max_rows=5)["n_total"] == 1000
    frame.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    empty = files.table("empty.parquet", head=5)
    assert list(empty.columns) == ["a", "b"] and empty.attrs["n_total"] == 0 and not table(empty)["truncated"]
    assert files.table("nope.parquet", head=5) is None and files.problems == []


def test_run_files_never_raise(tmp_path):
    files = RunFiles(tmp_path)
    assert files.json("nope.json") is None and files.table("nope.parquet") is None and files.image("n.png") is None
    assert files.problems == []
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "bad.parquet").write_text("x")
    (tmp_path / "bad.png").write_bytes(b"GIF89a")
    assert files.json("bad.json") is None and files.table("bad.parquet") is None and files.image("bad.png") is None
    assert len(files.problems) == 3
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    (tmp_path / "ok.png").write_bytes(png)
    uri = files.image("ok.png")
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
