"""RunStore: round trips, nested names, atomic writes that leave nothing behind on failure, and clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.store import RunStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "run")


def _listing(store: RunStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))


def test_creates_root(tmp_path):
    s = RunStore(tmp_path / "a" / "b")
    assert s.root.is_dir()


def test_missing_root_without_create(tmp_path):
    with pytest.raises(RefusalScopeError, match="does not exist"):
        RunStore(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_existing_root_without_create(store):
    assert RunStore(store.root, create=False).root == store.root


def test_json_round_trip(store):
    obj = {"layer": 12, "asr": 0.25, "name": "x", "tokens": ["I", "As"], "nested": {"a": None, "b": True}}
    p = store.write_json("run.json", obj)
    assert p == store.path("run.json") and store.exists("run.json")
    assert store.read_json("run.json") == obj
    assert store.read_json("run.json") is not obj


def test_json_stringifies_unknown_objects(store, tmp_path):
    store.write_json("c.json", {"out": tmp_path / "x", "t": (1, 2)})
    assert store.read_json("c.json") == {"out": str(tmp_path / "x"), "t": [1, 2]}


def test_json_overwrite(store):
    store.write_json("a.json", {"v": 1})
    store.write_json("a.json", {"v": 2})
    assert store.read_json("a.json") == {"v": 2}
    assert _listing(store) == ["a.json"]


def test_table_round_trip(store):
    frame = pd.DataFrame({"layer": [0, 1, 2], "score": [0.5, -1.25, 3.0], "text": ["a", "b", None],
                          "passes": [True, False, True]})
    store.write_table("candidates.parquet", frame)
    pd.testing.assert_frame_equal(store.read_table("candidates.parquet"), frame)


def test_table_index_is_not_kept(store):
    frame = pd.DataFrame({"x": [1, 2]}, index=[10, 20])
    store.write_table("t.parquet", frame)
    pd.testing.assert_frame_equal(store.read_table("t.parquet"), frame.reset_index(drop=True))


def test_tensor_round_trip_with_metadata(store):
    direction = torch.randn(8)
    means = torch.randn(3, 4).t()  # non-contiguous: the store makes it contiguous
    half = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    meta = {"layer": 3, "position": -1, "norm": 1.5, "model": "qwen", "tokens": ["I"], "cfg": {"a": [1, 2]}}
    store.write_tensors("direction.safetensors", {"direction": direction, "means": means, "half": half}, meta)
    tensors, got = store.read_tensors("direction.safetensors")
    assert set(tensors) == {"direction", "means", "half"}
    assert torch.equal(tensors["direction"], direction)
    assert torch.equal(tensors["means"], means)
    assert tensors["half"].dtype == torch.bfloat16 and torch.equal(tensors["half"], half)
    assert got == meta


def test_tensor_without_metadata(store):
    store.write_tensors("t.safetensors", {"x": torch.ones(2, requires_grad=True)})
    tensors, meta = store.read_tensors("t.safetensors")
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {}


def test_nested_names_create_folders(store):
    store.write_table("asr/x.parquet", pd.DataFrame({"a": [1]}))
    store.write_json("deep/er/y.json", [1])
    store.write_tensors("t/z.safetensors", {"a": torch.zeros(1)})
    assert (store.root / "asr" / "x.parquet").is_file()
    assert store.read_json("deep/er/y.json") == [1]
    assert store.exists("t/z.safetensors")


def test_failed_table_write_leaves_nothing(store):
    bad = pd.DataFrame({"a": [object()]})  # pyarrow cannot store a bare object
    with pytest.raises(Exception):
        store.write_table("asr/x.parquet", bad)
    assert _listing(store) == ["asr"]  # the folder, but no target and no temp file


def test_failed_write_keeps_the_good_version(store):
    good = pd.DataFrame({"a": [1, 2, 3]})
    store.write_table("asr/x.parquet", good)
    with pytest.raises(Exception):
        store.write_table("asr/x.parquet", pd.DataFrame({"a": [object()]}))
    pd.testing.assert_frame_equal(store.read_table("asr/x.parquet"), good)
    assert _listing(store) == ["asr", "asr/x.parquet"]


@pytest.fixture
def interrupted_store(store, monkeypatch):
    # a writer that gets half-way then dies (as on Ctrl-C): BaseException, not just Exception, must clean up
    store.write_table("t.parquet", pd.DataFrame({"a": [1]}))

    def half_then_interrupt(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_interrupt)
    return store


def test_interrupted_write_keeps_old_file_and_no_temp(interrupted_store):
    with pytest.raises(KeyboardInterrupt):
        interrupted_store.write_table("t.parquet", pd.DataFrame({"a": [2]}))
    assert _listing(interrupted_store) == ["t.parquet"]
    with pytest.raises(KeyboardInterrupt):
        interrupted_store.write_table("new.parquet", pd.DataFrame({"a": [2]}))
    assert _listing(interrupted_store) == ["t.parquet"]


@pytest.mark.parametrize("reader,name", [("read_json", "a.json"), ("read_table", "a.parquet"),
                                         ("read_tensors", "a.safetensors")])
def test_reading_missing_file(store, reader, name):
    with pytest.raises(RefusalScopeError, match=f"{name} is missing"):
        getattr(store, reader)(name)


def test_corrupt_json(store):
    store.path("run.json").write_text('{"model": "x",')
    with pytest.raises(RefusalScopeError, match="not valid JSON"):
        store.read_json("run.json")


def test_save_figure_writes_png(store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [1, 0, 1])
    try:
        p = store.save_figure("plots/cos.png", fig)
    finally:
        plt.close(fig)
    data = p.read_bytes()
    assert p == store.path("plots/cos.png") and data[:8] == PNG_MAGIC and len(data) > 100
    assert _listing(store) == ["plots", "plots/cos.png"]


# --- regressions: bugs found by these tests and fixed --------------------------------------------------------


def test_written_files_respect_umask(store):
    import os

    old = os.umask(0o022)
    try:
        p = store.write_json("run.json", {})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("reader,name", [("read_table", "a.parquet"), ("read_tensors", "a.safetensors")])
def test_corrupt_binary_files(store, reader, name):
    store.path(name).write_bytes(b"junk")
    with pytest.raises(RefusalScopeError):
        getattr(store, reader)(name)


def test_portable_writes_paths_inside_the_run_relative_to_it(tmp_path):
    store = RunStore(tmp_path / "run")
    outside = str(tmp_path / "data")
    value = {"out": str(store.root), "saes": str(store.path("saes/layer_1")), "data_dir": outside,
             "list": [str(store.root / "a.txt"), 3, None], "prompt": "Tell me how to pick a lock."}
    portable = store.portable(value)
    assert portable == {"out": "run:.", "saes": "run:saes/layer_1", "data_dir": outside,
                        "list": ["run:a.txt", 3, None], "prompt": "Tell me how to pick a lock."}
    # read where the run now lies
    moved = RunStore(tmp_path / "moved")
    assert moved.resolve(portable) == {**value, "out": str(moved.root), "saes": str(moved.path("saes/layer_1")),
                                       "list": [str(moved.root / "a.txt"), 3, None]}
    # a sibling whose name starts like the run's is not inside it
    assert store.portable(str(tmp_path / "run2" / "x")) == str(tmp_path / "run2" / "x")
