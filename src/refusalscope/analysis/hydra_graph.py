"""Hydra's graph of which ablation wakes which feature (paper, Fig. 2): the edges table and its aggregation.

An edge A → B is one finding of ``analysis.hydra``: ablating A's layer-block alone woke B on a prompt (weight: B's
max activation). Scope "all" finds every ablated feature of a block × every latent it wakes (340,000 rows per
prompt on average on the default model, tens of GB in memory over AdvBench), so the table is built a prompt at a time
(``edge_frames``), streamed to ``edges.parquet`` and summed into ``EdgeTotals`` (memory ∝ distinct edges); the
graphs are drawn from the totals (``graph_from_totals``), and only the kept edges become networkx objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.features import Feature, features_of

if TYPE_CHECKING:
    import pyarrow as pa

    from refusalscope.analysis.hydra import HydraPrompt

# ---- edges ---------------------------------------------------------------------------------------------------------

EDGE_COLUMNS = {"id": "int64", "set": "string", "scope": "string", "source": "string", "target": "string",
                "block_layer": "int64", "weight": "float64"}
_LATENT_BITS = 24  # a feature's integer code: layer << 24 | latent (SAE widths below 2^24 = 16.7M latents)


def feature_codes(features: Sequence[Feature]) -> np.ndarray:
    """Features as int64 codes that sort as the features do (``code_names`` reads them back)."""
    layers = np.fromiter((f[0] for f in features), dtype=np.int64, count=len(features))
    latents = np.fromiter((f[1] for f in features), dtype=np.int64, count=len(features))
    if len(features) and latents.max() >= 1 << _LATENT_BITS:
        raise RefusalScopeError(f"SAE latents beyond 2^{_LATENT_BITS} are not supported by hydra's edge tables")
    return (layers << _LATENT_BITS) | latents


def code_names(codes: np.ndarray) -> np.ndarray:
    """The features' string forms ("L17/1204"), one per code (each distinct code formatted once)."""
    uniq, inverse = np.unique(codes, return_inverse=True)
    names = np.array([f"L{c >> _LATENT_BITS}/{c & ((1 << _LATENT_BITS) - 1)}" for c in uniq.tolist()], dtype=object)
    return names[inverse]


def edge_frames(results: Sequence[HydraPrompt], scopes: Sequence[str]):
    """Per prompt, its edges table (the ``EDGE_COLUMNS``; set and scope categorical, source and target as
    ``feature_codes``): every (A, B) with A in a layer-block that woke B, rows ordered by set, scope, block, B,
    then A."""
    for r in results:
        parts = []
        for s in r.sets:
            for scope, blocks in (("set", s.blocks), ("all", s.blocks_all)):
                if scope not in scopes:
                    continue
                for b in blocks:
                    k, m = len(b.ablated), len(b.woken)
                    if not k * m:
                        continue
                    parts.append((s.name, scope, b.layer, np.tile(feature_codes(b.ablated), m),
                                  np.repeat(feature_codes([w.feature for w in b.woken]), k),
                                  np.repeat(np.array([w.max_act for w in b.woken], dtype=np.float64), k)))
        if not parts:
            continue
        sizes = [len(p[3]) for p in parts]

        def category(values):  # per-row labels without a string per row
            names = sorted(set(values))
            return pd.Categorical.from_codes(np.repeat([names.index(v) for v in values], sizes), names)

        yield pd.DataFrame({"id": np.full(sum(sizes), r.id, dtype=np.int64),
                            "set": category([p[0] for p in parts]), "scope": category([p[1] for p in parts]),
                            "source": np.concatenate([p[3] for p in parts]),
                            "target": np.concatenate([p[4] for p in parts]),
                            "block_layer": np.repeat(np.array([p[2] for p in parts], dtype=np.int64), sizes),
                            "weight": np.concatenate([p[5] for p in parts])})


def _strings(values) -> "pa.Array":
    """A pyarrow string column from a categorical or from ``feature_codes`` (each distinct value named once)."""
    import pyarrow as pa

    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, names = values.cat.codes.to_numpy(), [str(c) for c in values.cat.categories]
    else:
        uniq, codes = np.unique(values.to_numpy(dtype=np.int64), return_inverse=True)
        names = code_names(uniq).tolist()
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names, pa.string())) \
        .cast(pa.string())


def arrow_edges(frame: pd.DataFrame) -> "pa.Table":
    """An ``edge_frames`` table in its edges.parquet form: the ``EDGE_COLUMNS``, features as strings."""
    import pyarrow as pa

    return pa.table({c: _strings(frame[c]) if t == "string" else pa.array(frame[c].to_numpy(), getattr(pa, t)())
                     for c, t in EDGE_COLUMNS.items()})


def named_edges(frame: pd.DataFrame) -> pd.DataFrame:
    """An ``edge_frames`` table as the edges.parquet table reads back in pandas."""
    return arrow_edges(frame).to_pandas()


def empty_edges() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if t == "int64" else "float64" if t == "float64" else object)
                         for c, t in EDGE_COLUMNS.items()})


def _segments(keys: np.ndarray) -> np.ndarray:
    """Starts of the runs of equal values in a sorted array."""
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)


class EdgeTotals:
    """Edge statistics over prompts, added a table at a time: per (source, target), ``n_prompts`` (distinct
    prompts), ``n`` (prompt × set findings), the weight's sum and max, and which sets found it. Numpy sorts and
    segment reductions on one int64 key per edge (pandas' multi-key groupby took most of the outputs' time);
    memory grows with the distinct edges (33 bytes each), not with the rows added, and ``frame`` cuts to the kept
    edges before it builds a table. Tables added must not share prompts."""

    _MAX_LAYER = 1 << (31 - _LATENT_BITS)  # a (source, target) key: two 31-bit feature codes in one int64
    FIELDS = ("key", "n_prompts", "n", "sum", "max", "bits")

    # flush_rows, our choice: merge the per-prompt parts once they hold 4M edges (memory vs. re-sorting; same totals)
    def __init__(self, set_names: Sequence[str], flush_rows: int = 4_000_000):
        self.names = list(set_names)
        if len(self.names) > 8:
            raise RefusalScopeError("hydra's edge totals hold at most 8 set names")
        self.flush_rows = flush_rows
        self._parts: list[dict[str, np.ndarray]] = []  # FIELDS → array, each part sorted by key, keys distinct
        self._rows = 0

    def add(self, edges: pd.DataFrame) -> None:
        """``edges``: columns id, set, source, target (``feature_codes``) and weight."""
        if not len(edges):
            return
        src, tgt = (edges[k].to_numpy(dtype=np.int64) for k in ("source", "target"))
        if max(src.max(), tgt.max()) >= self._MAX_LAYER << _LATENT_BITS:
            raise RefusalScopeError(f"hydra's edge totals support layers below {self._MAX_LAYER}")
        key = (src << 31) | tgt
        ids = edges["id"].to_numpy(dtype=np.int64)
        # a bit per set name present, then per row (edge_frames' columns are categorical already)
        sets = edges["set"].astype("category").cat.remove_unused_categories()
        bits = np.array([1 << self.names.index(c) for c in sets.cat.categories], dtype=np.uint8)[sets.cat.codes]
        order = np.lexsort((ids, key))  # by edge, then prompt; stable, so sums run in row order
        key, ids, w, bits = key[order], ids[order], edges["weight"].to_numpy(dtype=np.float64)[order], bits[order]
        starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (ids[1:] != ids[:-1])])
        per_prompt = {"key": key[starts], "n_prompts": np.ones(len(starts), dtype=np.int32),
                      "n": np.diff(np.r_[starts, len(key)]).astype(np.int32), "sum": np.add.reduceat(w, starts),
                      "max": np.maximum.reduceat(w, starts), "bits": np.bitwise_or.reduceat(bits, starts)}
        k = per_prompt["key"]  # sorted; equal keys only where one edge has several prompts in this table
        self._parts.append(per_prompt if (k[1:] != k[:-1]).all() else self._reduce([per_prompt]))
        self._rows += len(self._parts[-1]["key"])
        if self._rows > self.flush_rows:
            self._parts = [self._reduce(self._parts)]
            self._rows = len(self._parts[0]["key"])
            self.flush_rows = max(self.flush_rows, 2 * self._rows)  # each row is regrouped O(log) times

    @staticmethod
    def _reduce(parts) -> dict[str, np.ndarray]:
        """One part: equal keys combined. A field at a time, each freed as it is done (memory: the key, the order
        and two copies of one field)."""
        if len(parts) == 1 and len(parts[0]["key"]) < 2:
            return parts[0]
        key = np.concatenate([p.pop("key") for p in parts])
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = _segments(key)
        out = {"key": key[starts]}
        del key
        for field, reduce in (("n_prompts", np.add), ("n", np.add), ("sum", np.add), ("max", np.maximum),
                              ("bits", np.bitwise_or)):
            out[field] = reduce.reduceat(np.concatenate([p.pop(field) for p in parts])[order], starts)
        return out

    def frame(self, min_prompts: int = 1, max_edges: int | None = None) -> pd.DataFrame:
        """Columns source, target (``feature_codes``), n_prompts, n, mean_weight, max_weight, sets
        ("stage2,stage3"), for the edges found on at least ``min_prompts`` prompts; with ``max_edges``, only that
        many: the most prompts first, then the highest mean weight, then feature order (and sorted so), else sorted
        by (source, target)."""
        parts = self._parts or [{f: np.zeros(0, dtype=np.int64 if f != "bits" else np.uint8) for f in self.FIELDS}]
        self._parts = [self._reduce(parts)]
        t = self._parts[0]
        keep = np.flatnonzero(t["n_prompts"] >= min_prompts)
        if max_edges is not None and len(keep) > max_edges:
            keep = self._top(keep, t["n_prompts"][keep], t["sum"][keep] / t["n"][keep], max_edges) if max_edges \
                else keep[:0]
        n, total = t["n"][keep], t["sum"][keep]
        labels = np.array([",".join(x for i, x in enumerate(self.names) if b >> i & 1) for b in range(256)],
                          dtype=object)
        return pd.DataFrame({"source": t["key"][keep] >> 31, "target": t["key"][keep] & ((1 << 31) - 1),
                             "n_prompts": t["n_prompts"][keep].astype(np.int64), "n": n.astype(np.int64),
                             "mean_weight": total / n, "max_weight": t["max"][keep], "sets": labels[t["bits"][keep]]})

    @staticmethod
    def _top(rows: np.ndarray, n_prompts: np.ndarray, mean: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` of ``rows`` (ascending: feature order) with the most prompts, then the highest mean, then the
        first in feature order, in that order. Linear time: partitions, then a sort of the ``k`` kept."""
        v = np.partition(n_prompts, len(n_prompts) - k)[len(n_prompts) - k]  # the k-th most prompts
        above, tied = np.flatnonzero(n_prompts > v), np.flatnonzero(n_prompts == v)
        need = k - len(above)
        m = np.partition(mean[tied], len(tied) - need)[len(tied) - need]  # the need-th highest mean among the tied
        over, at = tied[mean[tied] > m], tied[mean[tied] == m]
        # our choice: ties at the cut go to the first in feature order (deterministic; the paper draws no graph)
        chosen = np.concatenate([above, over, at[:need - len(over)]])  # ``at`` is in feature order
        chosen = chosen[np.lexsort((chosen, -mean[chosen], -n_prompts[chosen]))]
        return rows[chosen]


# ---- graph ----------------------------------------------------------------------------------------------------------

def build_graph(edges: pd.DataFrame, *, scope: str = "set", min_prompts: int = 1,
                roles: Mapping[str, Mapping] | None = None, max_edges: int | None = None):
    """The directed graph of which layer-block ablation wakes which feature (networkx ``DiGraph``), for one wake
    ``scope`` (edges without a ``scope`` column count as "set"): ``edges`` as in edges.parquet (source and target
    as feature strings or ``feature_codes``). ``graph_from_totals`` builds it from ``EdgeTotals`` (no table)."""
    if "scope" in edges.columns:
        edges = edges[edges["scope"] == scope]
    if len(edges) and not pd.api.types.is_integer_dtype(edges["source"]):
        edges = edges.assign(**{k: feature_codes(features_of(edges[k])) for k in ("source", "target")})
    totals = EdgeTotals(sorted(set(edges["set"])))
    totals.add(edges)
    return graph_from_totals(totals, scope=scope, min_prompts=min_prompts, roles=roles, max_edges=max_edges)


def graph_from_totals(totals: EdgeTotals, *, scope: str = "set", min_prompts: int = 1,
                      roles: Mapping[str, Mapping] | None = None, max_edges: int | None = None):
    """The graph of the edges in ``totals`` found on at least ``min_prompts`` prompts (networkx ``DiGraph``).

    Edge A → B aggregated over prompts and sets: ``n_prompts`` (distinct prompts), ``n`` (prompt × set
    findings), ``mean_weight``/``max_weight`` (B's max activation under the ablation of A's layer-block), ``sets``.
    ``max_edges`` keeps the edges found on the most prompts, then by mean weight, then in feature order: scope
    "all" finds millions. Nodes carry ``layer``, ``latent``, ``groups`` (stage2/stage3), ``role`` (dormant, active or
    both over the prompts; "outside" for a latent of no examined set, scope "all") and counts
    ``n_dormant``/``n_active``.
    """
    import networkx as nx

    g = nx.DiGraph(scope=scope)
    agg = totals.frame(min_prompts, max_edges)
    if len(agg):
        sources, targets = (code_names(agg[k].to_numpy(dtype=np.int64)) for k in ("source", "target"))
        g.add_edges_from((a, b, {"n_prompts": int(n_p), "n": int(n), "mean_weight": float(mw),
                                 "max_weight": float(xw), "sets": st})
                         for a, b, n_p, n, mw, xw, st in zip(sources, targets, agg["n_prompts"], agg["n"],
                                                             agg["mean_weight"], agg["max_weight"], agg["sets"]))
    roles = roles or {}
    for node in g.nodes:
        f = Feature.parse(node)
        info = roles.get(node, {})
        n_d, n_a = int(info.get("dormant", 0)), int(info.get("active", 0))
        role = "both" if n_d and n_a else ("dormant" if n_d else ("active" if n_a else "outside"))
        g.nodes[node].update(layer=f.layer, latent=f.latent, role=role, n_dormant=n_d, n_active=n_a,
                             groups=",".join(sorted(info.get("groups", ()))))
    return g


def feature_roles(results: Sequence[HydraPrompt]) -> dict[str, dict]:
    """Per feature: on how many prompt sets it was dormant / active, and in which set groups it appears."""
    out: dict[str, dict] = {}
    for r in results:
        for s in r.sets:
            for kind, fs in (("dormant", s.dormant), ("active", s.active)):
                for f in fs:
                    info = out.setdefault(str(f), {"dormant": 0, "active": 0, "groups": set()})
                    info[kind] += 1
                    info["groups"].add(s.name)
    return out


def graph_json(g) -> dict:
    import networkx as nx

    return nx.node_link_data(g, edges="edges")


COLOURS = {"dormant": "tab:red", "active": "tab:blue", "both": "tab:purple", "outside": "tab:green"}
TITLES = {"set": "scope set: the sets' dormant features", "all": "scope all: any latent off on the clean prompt"}


def _draw(ax, g, max_edges: int, title: str) -> None:
    import networkx as nx

    ax.set_axis_off()
    if g.number_of_edges() == 0:
        ax.text(0.5, 0.5, "no layer-block ablation woke a feature", ha="center", va="center")
        ax.set_title(title, fontsize=9)
        return
    kept = sorted(g.edges(data=True), key=lambda e: (-e[2]["n_prompts"], -e[2]["mean_weight"]))[:max_edges]
    h = nx.DiGraph()
    h.add_nodes_from((n, g.nodes[n]) for n in sorted({n for e in kept for n in e[:2]}, key=Feature.parse))
    h.add_edges_from(kept)
    pos = nx.multipartite_layout(h, subset_key="layer")
    nx.draw_networkx_nodes(h, pos, ax=ax, node_size=120, node_color=[COLOURS[h.nodes[n]["role"]] for n in h.nodes])
    top = max(d["n_prompts"] for *_, d in kept)
    nx.draw_networkx_edges(h, pos, ax=ax, width=[0.5 + 2.5 * d["n_prompts"] / top for *_, d in kept],
                           arrows=True, arrowsize=8, edge_color="grey", connectionstyle="arc3,rad=0.1")
    if h.number_of_nodes() <= 60:
        nx.draw_networkx_labels(h, {n: (x, y + 0.05) for n, (x, y) in pos.items()}, ax=ax, font_size=6)
    for layer in sorted({h.nodes[n]["layer"] for n in h.nodes}):
        xs = [pos[n][0] for n in h.nodes if h.nodes[n]["layer"] == layer]
        ax.text(sum(xs) / len(xs), -0.02, str(layer), transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8)
    ax.text(0.5, -0.08, "SAE layer", transform=ax.transAxes, ha="center", va="top", fontsize=8)
    shown = "" if len(kept) == g.number_of_edges() else f"; top {len(kept)} of {g.number_of_edges()} edges"
    ax.set_title(f"{title}\nA → B: ablating A's layer-block wakes B (width ∝ prompts{shown})", fontsize=9)


def plot_graph(graphs, max_edges: int = 200):
    """The graph(s) layered by SAE layer (x), one panel per scope (``graphs``: a DiGraph or scope → DiGraph):
    dormant features red, active blue, both purple, latents of no examined set green; edge width ∝ prompts; at
    most ``max_edges`` edges drawn per panel (most prompts first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = graphs if isinstance(graphs, dict) else {graphs.graph.get("scope", "set"): graphs}
    fig, axes = plt.subplots(1, len(graphs), figsize=(9 * len(graphs), 6), squeeze=False)
    for ax, (scope, g) in zip(axes[0], graphs.items()):
        _draw(ax, g, max_edges, TITLES.get(scope, scope))
    roles = {d["role"] for g in graphs.values() for _, d in g.nodes(data=True)}
    for role, colour in COLOURS.items():
        if role in roles or role != "outside":
            axes[0][-1].scatter([], [], color=colour, label=role)
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="role",
                       title_fontsize=8)
    return fig
