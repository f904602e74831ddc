"""Hydra's edges and graph: the streamed edge table and ``EdgeTotals`` against a plain pandas aggregation of the
whole table, the graph's cut at ``max_edges``, feature codes, and ``write_outputs``' files against the in-memory
tables."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from refusalscope.analysis import hydra, hydra_graph
from refusalscope.config import HydraSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.report.blocks import RunFiles
from refusalscope.saes.features import Feature
from refusalscope.store import RunStore


def _prompt(pid: int, rng: np.random.Generator) -> hydra.HydraPrompt:
    """A finished prompt with random layer-blocks and wakes in both sets and both scopes; features drawn from a
    small pool, so edges repeat across prompts, and every third prompt's sets find the same edges."""
    sets = []
    for name in ("stage2", "stage3"):
        blocks = {"set": [], "all": []}
        if name == "stage3" and pid % 3 == 0:
            blocks = {"set": sets[0].blocks, "all": sets[0].blocks_all}
        for scope in blocks if not blocks["set"] else ():
            for layer in sorted(rng.choice([2, 3, 5, 11], size=2, replace=False).tolist()):
                ablated = sorted({Feature(layer, int(x)) for x in rng.integers(0, 6, size=3)})
                woken = sorted({Feature(int(rng.integers(layer + 1, 14)), int(rng.integers(0, 5)))
                                for _ in range(rng.integers(0, 4))})
                blocks[scope].append(hydra.BlockWake(layer=layer, ablated=ablated, woken=[
                    hydra.Firing(feature=f, max_act=float(rng.integers(1, 8)) / 4, positions=[1],
                                 activations=[1.0]) for f in woken]))
        sets.append(hydra.SetResult(name=name, features=[], clean=[], dormant=[], active=[], judge="j",
                                    jailbroken_full=False, jailbroken_without_dormant=False, completion_full="",
                                    completion_without_dormant="", blocks=blocks["set"], blocks_all=blocks["all"]))
    return hydra.HydraPrompt(id=pid, prompt=f"p{pid}", settings={}, tokens=["a", "b"], segments=["user", "user"],
                             max_norm_layers=[], sets=sets)


def _plain_edges(results, scopes) -> pd.DataFrame:
    """The edge table as one row per (A, B) finding, from dicts (the form ``edge_frames`` vectorizes)."""
    rows = []
    for r in results:
        for s in r.sets:
            for scope, blocks in (("set", s.blocks), ("all", s.blocks_all)):
                if scope in scopes:
                    rows += [{"id": r.id, "set": s.name, "scope": scope, "source": str(a), "target": str(w.feature),
                              "block_layer": b.layer, "weight": w.max_act}
                             for b in blocks for w in b.woken for a in b.ablated]
    return pd.DataFrame(rows, columns=list(hydra_graph.EDGE_COLUMNS))


def _plain_totals(edges: pd.DataFrame, scope: str) -> dict:
    """Per (source, target): n_prompts, n, mean and max weight, sets, by pandas over the whole table."""
    part = edges[edges["scope"] == scope]
    agg = part.groupby(["source", "target"]).agg(n_prompts=("id", "nunique"), n=("id", "size"),
                                                 mean_weight=("weight", "mean"), max_weight=("weight", "max"),
                                                 sets=("set", lambda x: ",".join(sorted(set(x)))))
    return {k: tuple(v) for k, v in zip(agg.index, agg.itertuples(index=False))}


def test_feature_codes_sort_as_features_and_read_back():
    fs = [Feature(3, 7), Feature(0, 16_777_215), Feature(25, 0), Feature(3, 2)]
    codes = hydra_graph.feature_codes(fs)
    assert np.argsort(codes).tolist() == sorted(range(4), key=lambda i: fs[i])
    assert hydra_graph.code_names(codes).tolist() == [str(f) for f in fs]
    with pytest.raises(RefusalScopeError, match="2\\^24"):
        hydra_graph.feature_codes([Feature(1, 1 << 24)])


@pytest.mark.parametrize("flush_rows", [1, 4_000_000])
def test_totals_over_prompts_equal_a_plain_aggregation(flush_rows):
    """Prompt by prompt (with merges forced after every prompt, or none until the end), the totals equal pandas'
    groupby over the whole table; the streamed table equals the one built row by row."""
    rng = np.random.default_rng(0)
    results = [_prompt(pid, rng) for pid in range(12)]
    whole = _plain_edges(results, ("set", "all"))
    streamed = pd.concat([hydra_graph.named_edges(f) for f in hydra_graph.edge_frames(results, ("set", "all"))],
                         ignore_index=True)
    pd.testing.assert_frame_equal(streamed, whole, check_dtype=False)
    for scope in ("set", "all"):
        totals = hydra_graph.EdgeTotals(["stage2", "stage3"], flush_rows=flush_rows)
        for frame in hydra_graph.edge_frames(results, (scope,)):
            totals.add(frame)
        got = totals.frame()
        names = {k: hydra_graph.code_names(got[k].to_numpy()) for k in ("source", "target")}
        got = {(a, b): (int(n_p), int(n), mw, xw, st) for a, b, n_p, n, mw, xw, st in zip(
            names["source"], names["target"], got["n_prompts"], got["n"], got["mean_weight"], got["max_weight"],
            got["sets"])}
        want = _plain_totals(whole, scope)
        assert got.keys() == want.keys() and len(want) > 20
        for k in want:
            assert got[k][:2] == want[k][:2] and got[k][4] == want[k][4], k
            assert got[k][2] == pytest.approx(want[k][2]) and got[k][3] == want[k][3], k
        assert any(v[0] > 1 for v in want.values()) and any(v[1] > v[0] for v in want.values())  # repeats seen


def test_graph_aggregates_edges_and_keeps_the_most_found():
    edges = pd.DataFrame([
        {"id": 1, "set": "stage2", "scope": "all", "source": "L3/1", "target": "L5/2", "block_layer": 3, "weight": 1.0},
        {"id": 2, "set": "stage3", "scope": "all", "source": "L3/1", "target": "L5/2", "block_layer": 3, "weight": 3.0},
        {"id": 2, "set": "stage3", "scope": "all", "source": "L3/1", "target": "L6/9", "block_layer": 3, "weight": 9.0},
        {"id": 1, "set": "stage2", "scope": "set", "source": "L3/1", "target": "L6/9", "block_layer": 3, "weight": 2.0},
        {"id": 3, "set": "stage3", "scope": "all", "source": "L2/4", "target": "L6/9", "block_layer": 2, "weight": 9.0},
    ])
    g = hydra_graph.build_graph(edges, scope="all")
    assert set(g.edges) == {("L3/1", "L5/2"), ("L3/1", "L6/9"), ("L2/4", "L6/9")}
    e = g.edges["L3/1", "L5/2"]
    assert (e["n_prompts"], e["n"], e["mean_weight"], e["max_weight"], e["sets"]) == (2, 2, 2.0, 3.0, "stage2,stage3")
    assert g.edges["L3/1", "L6/9"]["sets"] == "stage3"
    assert g.nodes["L6/9"]["layer"] == 6 and g.nodes["L6/9"]["role"] == "outside"
    top = hydra_graph.build_graph(edges, scope="all", max_edges=1)  # the edge found on more prompts wins
    assert set(top.edges) == {("L3/1", "L5/2")}
    # a tie on prompts and mean weight at the cut: feature order decides (L2/4 before L3/1)
    two = hydra_graph.build_graph(edges, scope="all", max_edges=2)
    assert set(two.edges) == {("L3/1", "L5/2"), ("L2/4", "L6/9")}
    assert set(hydra_graph.build_graph(edges, scope="all", min_prompts=2).edges) == {("L3/1", "L5/2")}
    assert set(hydra_graph.build_graph(edges, scope="set").edges) == {("L3/1", "L6/9")}
    assert hydra_graph.build_graph(edges.iloc[:0], scope="all").number_of_edges() == 0
    assert hydra_graph.EdgeTotals(["stage2", "stage3"]).frame(max_edges=0).empty


def test_graph_of_a_streamed_table_whose_sets_are_in_other_scopes():
    """An ``edge_frames`` table passed whole: its categorical set column names every set, some only in the scope
    not drawn."""
    rng = np.random.default_rng(2)
    prompt = _prompt(3, rng)
    prompt.sets[0].blocks = []  # stage2 finds nothing in scope "set"
    frame = next(hydra_graph.edge_frames([prompt], ("set", "all")))
    g = hydra_graph.build_graph(frame, scope="set")
    assert g.number_of_edges() and {d["sets"] for *_, d in g.edges(data=True)} == {"stage3"}


def test_write_outputs_streams_the_tables_it_would_build_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    results = [_prompt(pid, rng) for pid in range(6)]
    store = RunStore(tmp_path)
    summary = hydra.write_outputs(store, results, HydraSettings(run=tmp_path, graph_max_edges=7))
    frames = hydra.tables(results, "activation", ("set", "all"))
    pd.testing.assert_frame_equal(store.read_table("analyses/hydra/edges.parquet"), frames["edges"],
                                  check_dtype=False)
    for scope, name in (("set", "graph"), ("all", "graph_all")):
        want = hydra_graph.build_graph(frames["edges"], scope=scope, roles=hydra_graph.feature_roles(results),
                                       max_edges=7 if scope == "all" else None)
        got = store.read_json(f"analyses/hydra/{name}.json")
        assert {(e["source"], e["target"]) for e in got["edges"]} == set(want.edges)
        assert summary["scopes"][scope]["graph"]["edges"] == want.number_of_edges() > 0
    assert summary["scopes"]["all"]["graph"]["edges"] == 7
    none = hydra.write_outputs(RunStore(tmp_path / "empty"), [], HydraSettings(run=tmp_path))
    assert none["graph"]["edges"] == 0
    assert list(RunStore(tmp_path / "empty").read_table("analyses/hydra/edges.parquet").columns) == \
        list(hydra_graph.EDGE_COLUMNS)
    files = RunFiles(tmp_path / "empty")  # the report's preview of a table without rows
    head = files.table("analyses/hydra/edges.parquet", head=20)
    assert head is not None and head.empty and head.attrs["n_total"] == 0 and files.problems == []
    assert pq.ParquetFile(tmp_path / "empty/analyses/hydra/edges.parquet").metadata.num_row_groups == 1


@pytest.mark.parametrize("k", [1, 7, 40, 199])
def test_the_cut_keeps_what_a_full_sort_keeps(k):
    """``max_edges``: the linear selection (partitions, ties at the cut by feature order) equals sorting every
    edge by (most prompts, highest mean weight, feature order) and taking the first k, with many ties."""
    rng = np.random.default_rng(k)
    rows = 600
    edges = pd.DataFrame({"id": rng.integers(0, 5, rows), "set": rng.choice(["stage2", "stage3"], rows),
                          "source": rng.integers(0, 6, rows) + (2 << 24),
                          "target": rng.integers(0, 40, rows) + (9 << 24), "weight": rng.integers(1, 4, rows) / 2})
    totals = hydra_graph.EdgeTotals(["stage2", "stage3"])
    for _, part in edges.groupby("id"):
        totals.add(part)
    whole = totals.frame()
    assert len(whole) > k and whole.duplicated(["n_prompts", "mean_weight"]).any()
    want = whole.sort_values(["n_prompts", "mean_weight", "source", "target"], ascending=[False, False, True, True],
                             kind="stable").head(k).reset_index(drop=True)
    pd.testing.assert_frame_equal(totals.frame(max_edges=k), want)
    kept = totals.frame(min_prompts=2)
    assert len(kept) and (kept["n_prompts"] >= 2).all() and len(kept) == (whole["n_prompts"] >= 2).sum()
