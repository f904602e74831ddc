"""Stage 3 data: the prompt table and the SAE activations a factorization machine is trained on.

Paper, appendix "Dataset for training Factorization Machines": all 520 AdvBench prompts (label 1) and as many
Alpaca prompts (label 0, a seeded sample), split 80/10/10 with a seed; the inputs are SAE activations at the last
4 prompt positions (the post-instruction chat-template tokens, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``) of
every SAE layer from 2 to l*. A feature is (layer, latent); SAE "layer l" reads resid_post of decoder layer l.

Activations are kept sparse end to end: ``encode_last_positions`` returns COO tensors (z > 0 only), chunks of them
are stored resumably by ``collect_activations``, and ``combine`` turns them into a CSR design matrix with one
column per feature ("max" over the positions) or per (feature, position) ("positions").
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.data import split
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions.latents import encoder_on
from refusalscope.lm.hooks import Hook, StopForward, hooked
from refusalscope.lm.inference import length_sorted_batches
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature
from refusalscope.saes.sae import Sae, check_against_model
from refusalscope.store import RunStore

FIELDS = ("row", "position", "layer", "latent", "value")  # COO fields; indices int32, value float32
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------- prompt table

def build_prompt_table(harmful: Sequence[str], harmless_pool: Sequence[str], *, seed: int = 0,
                       fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> pd.DataFrame:
    """Columns ``prompt``, ``label`` (1 harmful, 0 harmless), ``split`` (train/val/test); harmful rows first.

    The harmless rows are a seeded sample of ``len(harmful)`` prompts of ``harmless_pool``.
    """
    if len(fractions) != len(SPLITS):
        raise RefusalScopeError(f"fractions must give train, val and test, got {list(fractions)}")
    if not harmful:
        raise RefusalScopeError("no harmful prompts given for the Stage 3 prompt table")
    if len(harmless_pool) < len(harmful):
        raise RefusalScopeError(f"the harmless pool holds {len(harmless_pool)} prompts but {len(harmful)} are needed "
                                "(one per harmful prompt); use a larger pool")
    rng = random.Random(seed)
    harmless = [harmless_pool[i] for i in rng.sample(range(len(harmless_pool)), len(harmful))]
    prompts = [*harmful, *harmless]
    labels = [1] * len(harmful) + [0] * len(harmless)
    splits = [""] * len(prompts)
    # Our choice: the split is stratified by label, so train, val and test are each balanced.
    for label, lo in ((1, 0), (0, len(harmful))):
        parts = split(list(range(lo, lo + len(harmful))), fractions, seed=rng.randrange(2**32))
        for name, idx in zip(SPLITS, parts):
            for i in idx:
                splits[i] = name
    return pd.DataFrame({"prompt": prompts, "label": labels, "split": splits})


# ----------------------------------------------------------------------------------------------- activations

def _empty_coo() -> dict[str, torch.Tensor]:
    out = {k: torch.zeros(0, dtype=torch.int32) for k in FIELDS[:-1]}
    out["value"] = torch.zeros(0, dtype=torch.float32)
    return out


def _cat_coo(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not parts:
        return _empty_coo()
    return {k: torch.cat([p[k] for p in parts]) for k in FIELDS}


def _sorted_coo(coo: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries ordered by (row, position, layer, latent)."""
    order = np.lexsort([coo[k].numpy() for k in ("latent", "layer", "position", "row")])
    idx = torch.from_numpy(order)
    return {k: coo[k][idx] for k in FIELDS}


@torch.inference_mode()
def encode_last_positions(lm, saes: Mapping[int, Sae], prompts: Sequence[str], *, n_positions: int = 4,
                          batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                          ) -> dict[str, torch.Tensor]:
    """SAE latents (z > 0 only) at the last ``n_positions`` positions of each chat-formatted prompt, as COO tensors.

    Returns {row, position, layer, latent, value}: row indexes ``prompts``, position counts from the end
    (-n_positions..-1; prompts are left-padded, so these are the same template tokens in every row), entries
    ordered by (row, position, layer, latent). One forward per batch, stopped after the highest SAE layer; each
    SAE's own ``encode`` (with its ``max_norm`` domain rule) runs on the recorded positions, one layer at a time.
    ``on_batch(n)`` is called after each batch of n prompts (with host-held SAEs, once for all of them).
    """
    if n_positions < 1:
        raise RefusalScopeError(f"n_positions must be at least 1, got {n_positions}")
    if not saes:
        raise RefusalScopeError("no SAEs given: Stage 3 needs at least one SAE layer")
    check_against_model(dict(saes), lm.n_layers, lm.d_model)
    layers = sorted(int(ly) for ly in saes)
    last = layers[-1]
    texts = format_chat(lm.tokenizer, prompts)

    def record(rows: list[int]) -> dict[int, torch.Tensor]:
        """One forward of the batch, stopped after the highest SAE layer: each layer's last positions."""
        batch = tokenize(lm.tokenizer, [texts[i] for i in rows], lm.device)
        if not bool(batch["attention_mask"][:, -n_positions:].all()):
            raise RefusalScopeError(f"a formatted prompt is shorter than n_positions={n_positions} tokens")
        acts: dict[int, torch.Tensor] = {}

        def recorder(layer: int):
            def edit(h: torch.Tensor):
                # as LatentRecorder feeds the SAE; a copy, so no view keeps the whole hidden state alive
                acts[layer] = h[:, -n_positions:, :].to(torch.float32, copy=True)
                if layer == last:
                    raise StopForward
            return edit

        try:
            with hooked(lm.model, [Hook("resid_post", ly, recorder(ly)) for ly in layers]):
                lm.model(**batch, logits_to_keep=1, use_cache=False)
        except StopForward:
            pass
        return acts

    batches = list(length_sorted_batches(texts, lm.tokenizer, batch_size))
    # SAEs held elsewhere (host memory, or bfloat16) bring each layer's encoder over once for all of this call's
    # batches, not once per batch: their last positions are recorded first (small: prompts × n_positions × d per
    # layer). Each batch is still encoded alone, so the results are the per-batch ones, bit for bit
    host = any(not saes[layer].ready_on(lm.device) for layer in layers)
    parts: list[dict[str, torch.Tensor]] = []
    for group in ([batches] if host else [[rows] for rows in batches]):
        recorded = [(rows, record(rows)) for rows in group]
        for layer in layers:
            enc = encoder_on(saes[layer], lm.device)  # float32 on the model's device (itself when already so)
            for rows, acts in recorded:
                z = enc.encode(acts.pop(layer))  # (B, n_positions, width): one layer, one batch
                b, p, j = (z > 0).nonzero(as_tuple=True)
                parts.append({"row": torch.tensor(rows, dtype=torch.int32)[b.cpu()],
                              "position": (p - n_positions).to(torch.int32).cpu(),
                              "layer": torch.full((len(b),), layer, dtype=torch.int32),
                              "latent": j.to(torch.int32).cpu(), "value": z[b, p, j].float().cpu()})
                del z
            del enc
        if on_batch is not None:
            on_batch(sum(len(rows) for rows, _ in recorded))
    return _sorted_coo(_cat_coo(parts))


def _prompts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _sae_fingerprint(sae: Sae) -> str:
    """Cheap identity of an SAE: its configuration and the exact bytes of its biases and first encoder row."""
    h = hashlib.sha256(json.dumps([sae.arch, sae.d_in, sae.width, sae.k, sae.max_norm, sae.apply_b_dec_to_input,
                                   sae.source]).encode())
    for t in (sae.b_enc, sae.b_dec, sae.W_enc[0], sae.threshold):
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _chunk_meta(lm, saes: Mapping[int, Sae], texts: Sequence[str], n_positions: int) -> dict:
    return {"prompts_hash": _prompts_hash(texts), "n_prompts": len(texts), "layers": sorted(int(ly) for ly in saes),
            "n_positions": int(n_positions), "saes": {str(ly): _sae_fingerprint(saes[ly]) for ly in sorted(saes)},
            "model": str(getattr(lm, "name", ""))}


def _read_meta(path) -> dict | None:
    """A chunk file's metadata, or None when it is missing or unreadable (then it is recomputed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception:
        return None
    return meta if keys == set(FIELDS) else None


def write_chunk(lm, saes: Mapping[int, Sae], store: RunStore, item: tuple[Sequence[str], str, dict], *,
                n_positions: int = 4, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                ) -> dict[str, torch.Tensor]:
    """One chunk, ``item`` = (prompts, file name, metadata): ``encode_last_positions``, stored atomically."""
    prompts, name, meta = item
    coo = encode_last_positions(lm, saes, prompts, n_positions=n_positions, batch_size=batch_size, on_batch=on_batch)
    store.write_tensors(name, coo, metadata=meta)
    return coo


def collect_activations(lm, saes: Mapping[int, Sae], table: pd.DataFrame, store: RunStore, *,
                        name: str = "stage3/activations", chunk_size: int = 64, batch_size: int = 16,
                        n_positions: int = 4, progress: bool = True,
                        compute: Callable[[list[tuple[list[str], str, dict]]], None] | None = None
                        ) -> dict[str, torch.Tensor]:
    """``encode_last_positions`` of ``table.prompt``, resumable; row = the table's row number (0-based).

    Chunk c (prompts c·chunk_size …) is stored atomically as ``{name}/chunk_{c:05d}.safetensors`` with chunk-local
    rows; a chunk whose metadata (prompts hash, layers, n_positions, SAE fingerprints, model) matches is reused,
    any other is recomputed. Chunk files past the table's end are left alone. ``compute``, when given, writes the
    missing chunks elsewhere first (``write_chunk`` on each item, e.g. on Ray workers); they are then read back.
    """
    if chunk_size < 1:
        raise RefusalScopeError(f"chunk_size must be at least 1, got {chunk_size}")
    prompts = [str(p) for p in table["prompt"].tolist()]
    bounds = [(lo, min(len(prompts), lo + chunk_size)) for lo in range(0, len(prompts), chunk_size)]
    names = [f"{name}/chunk_{c:05d}.safetensors" for c in range(len(bounds))]
    metas = [_chunk_meta(lm, saes, prompts[lo:hi], n_positions) for lo, hi in bounds]
    valid = [_read_meta(store.path(n)) == m for n, m in zip(names, metas)]
    if compute is not None and not all(valid):
        compute([(prompts[lo:hi], n, m) for (lo, hi), n, m, ok in zip(bounds, names, metas, valid) if not ok])
        valid = [_read_meta(store.path(n)) == m for n, m in zip(names, metas)]
    done = sum(hi - lo for (lo, hi), ok in zip(bounds, valid) if ok)
    parts = []
    with tqdm(total=len(prompts), initial=done, desc="stage 3 activations", unit="prompt", disable=not progress,
              dynamic_ncols=True) as bar:
        for (lo, hi), chunk, meta, ok in zip(bounds, names, metas, valid):
            if ok:
                coo, _ = store.read_tensors(chunk)
            else:
                coo = write_chunk(lm, saes, store, (prompts[lo:hi], chunk, meta), n_positions=n_positions,
                                  batch_size=batch_size, on_batch=bar.update)
            coo = dict(coo)
            coo["row"] = coo["row"] + lo
            parts.append(coo)
    return _cat_coo(parts)


# ----------------------------------------------------------------------------------------------- design matrix

class PositionedFeature(NamedTuple):
    """A "positions"-mode column: a feature at one prompt position (counted from the end). Str: "L17/1204@-2"."""

    layer: int
    latent: int
    position: int

    @property
    def feature(self) -> Feature:
        return Feature(self.layer, self.latent)

    def __str__(self) -> str:
        return f"L{self.layer}/{self.latent}@{self.position}"


Column = Union[Feature, PositionedFeature]


def feature_of_column(col) -> Feature:
    """The feature a column belongs to (a Feature column is its own feature)."""
    if isinstance(col, PositionedFeature):
        return col.feature
    if isinstance(col, str):
        return feature_of_column(column_of(col))
    if len(col) == 3:
        return Feature(int(col[0]), int(col[1]))
    return Feature.of(col)


def column_of(value) -> Column:
    """A column key from its JSON form ([layer, latent] or [layer, latent, position]) or its string form."""
    if isinstance(value, str):
        text, _, pos = value.strip().partition("@")
        f = Feature.parse(text)
        return PositionedFeature(f.layer, f.latent, int(pos)) if pos else f
    if len(value) == 3:
        return PositionedFeature(int(value[0]), int(value[1]), int(value[2]))
    return Feature.of(value)


def column_features(columns: Sequence) -> list[Feature]:
    return [feature_of_column(c) for c in columns]


class ColumnList(Sequence):
    """Columns as three integer arrays (layer, latent, position or None for Feature columns); each column object is
    made when asked for. Equal to the list of those columns."""

    def __init__(self, layer: np.ndarray, latent: np.ndarray, position: np.ndarray | None):
        self.layer, self.latent, self.position = layer, latent, position

    def __len__(self) -> int:
        return len(self.layer)

    def __iter__(self):
        layer, latent = self.layer.tolist(), self.latent.tolist()
        if self.position is None:
            return iter([Feature(a, b) for a, b in zip(layer, latent)])
        return iter([PositionedFeature(a, b, p) for a, b, p in zip(layer, latent, self.position.tolist())])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ColumnList(self.layer[i], self.latent[i], None if self.position is None else self.position[i])
        if self.position is None:
            return Feature(int(self.layer[i]), int(self.latent[i]))
        return PositionedFeature(int(self.layer[i]), int(self.latent[i]), int(self.position[i]))

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class ColumnSpace(Sequence):
    """The columns of ``combine``'s matrix, each made when asked for: every latent of ``layers`` in (layer, latent)
    order, and in "positions" mode each of those at positions -n_positions..-1. A Gemma-2-2B FM has 1.6M columns
    (6.3M in "positions" mode) of which only the kept ones are ever read, and building all of them as Python
    objects cost tens of seconds (benchmarks/bench_design_matrix.py). Equal to the list of those columns."""

    def __init__(self, layers: Sequence[int], width_by_layer: Mapping[int, int], mode: str, n_positions: int):
        self.layers = [int(ly) for ly in layers]
        self.widths = np.array([int(width_by_layer[ly]) for ly in self.layers], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)
        self.mode, self.n_positions = mode, int(n_positions)
        self.per = 1 if mode == "max" else self.n_positions
        self._size = int(self.widths.sum()) * self.per
        self._where = {ly: k for k, ly in enumerate(self.layers)}

    def __len__(self) -> int:
        return self._size

    def take(self, index) -> "ColumnList":
        """The columns at ``index`` (integers, not a boolean mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            raise TypeError("take() wants column indices, not a boolean mask (np.flatnonzero it first)")
        index = index.astype(np.int64).ravel()
        if len(index) and (index.min() < 0 or index.max() >= self._size):
            raise IndexError(f"column index out of range 0..{self._size - 1}")
        feat, pos = np.divmod(index, self.per)
        k = np.searchsorted(self.offsets, feat, side="right") - 1
        return ColumnList(np.asarray(self.layers, dtype=np.int64)[k], feat - self.offsets[k],
                          None if self.mode == "max" else pos - self.per)

    def __iter__(self):
        for start in range(0, self._size, 1 << 16):
            yield from self.take(np.arange(start, min(start + (1 << 16), self._size)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(self._size)[i])
        i = int(i)
        return self.take([i + self._size if i < 0 else i])[0]

    def columns_of(self, feature: Feature) -> np.ndarray | None:
        """The indices of ``feature``'s columns (one, or one per position); None when it has none here."""
        k = self._where.get(feature.layer)
        if k is None or not 0 <= feature.latent < self.widths[k]:
            return None
        first = (int(self.offsets[k]) + feature.latent) * self.per
        return np.arange(first, first + self.per)

    def index(self, value, start: int = 0, stop: int | None = None) -> int:
        """As ``list.index``, by arithmetic: a column object, or its string or [layer, latent(, position)] form."""
        n = len(self)
        start = max(start + n, 0) if start < 0 else start
        stop = n if stop is None else (max(stop + n, 0) if stop < 0 else min(stop, n))
        try:
            col = value if isinstance(value, (Feature, PositionedFeature)) else column_of(value)
        except (TypeError, ValueError):
            col = None
        positioned = isinstance(col, PositionedFeature)
        if col is not None and positioned == (self.mode == "positions"):
            idx = self.columns_of(feature_of_column(col))
            if idx is not None and (not positioned or -self.per <= col.position < 0):
                i = int(idx[0]) + (col.position + self.per if positioned else 0)
                if start <= i < stop:
                    return i
        raise ValueError(f"{value} is not a column here")

    def __contains__(self, value) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other) -> bool:
        if isinstance(other, ColumnSpace):
            return (self.layers, self.widths.tolist(), self.mode, self.per) == \
                (other.layers, other.widths.tolist(), other.mode, other.per)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def combine(coo: Mapping[str, object], n_rows: int, layers: Iterable[int], width_by_layer: Mapping[int, int], *,
            mode: str = "max", n_positions: int = 4):
    """(CSR float32 matrix (n_rows, n_columns), columns) from COO activations.

    "max": one column per Feature (value = max over the positions); "positions": one column per
    PositionedFeature (position -n_positions..-1). Columns cover every latent of ``layers`` in (layer, latent[,
    position]) order; entries of other layers are ignored.
    """
    from scipy import sparse

    if mode not in ("max", "positions"):
        raise RefusalScopeError(f"mode must be 'max' or 'positions', not {mode!r}")
    layers = sorted({int(ly) for ly in layers})
    if not layers:
        raise RefusalScopeError("combine needs at least one layer")
    missing = [ly for ly in layers if ly not in width_by_layer]
    if missing:
        raise RefusalScopeError(f"no width given for layers {missing}")
    offsets, total = {}, 0
    for ly in layers:
        offsets[ly] = total
        total += int(width_by_layer[ly])
    row, pos, layer, latent = (_np(coo[k]).astype(np.int64) for k in ("row", "position", "layer", "latent"))
    value = _np(coo["value"]).astype(np.float32)
    keep = np.isin(layer, layers)
    row, pos, layer, latent, value = row[keep], pos[keep], layer[keep], latent[keep], value[keep]
    lut = np.zeros(max(layers) + 1, dtype=np.int64)
    width = np.zeros(max(layers) + 1, dtype=np.int64)
    for ly in layers:
        lut[ly], width[ly] = offsets[ly], width_by_layer[ly]
    if len(row) and ((latent < 0).any() or (latent >= width[layer]).any()):
        raise RefusalScopeError("a latent index lies outside its SAE's width")
    if len(row) and ((row < 0).any() or (row >= n_rows).any()):
        raise RefusalScopeError(f"a row index lies outside 0..{n_rows - 1}")
    if len(row) and ((pos < -n_positions).any() or (pos >= 0).any()):
        raise RefusalScopeError(f"a position lies outside -{n_positions}..-1")
    feat_col = lut[layer] + latent
    if mode == "max":
        n_cols = total
        key = row * n_cols + feat_col
        order = np.argsort(key, kind="stable")
        key, value = key[order], value[order]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        starts = np.flatnonzero(first)
        # the largest value of each (row, column) over its positions
        key, value = key[starts], np.maximum.reduceat(value, starts) if len(starts) else value
        r, c = key // n_cols, key % n_cols
    else:
        n_cols = total * n_positions
        r, c = row, feat_col * n_positions + (pos + n_positions)
    X = sparse.csr_matrix((value.astype(np.float32), (r, c)), shape=(n_rows, n_cols), dtype=np.float32)
    X.sum_duplicates()
    return X, ColumnSpace(layers, width_by_layer, mode, n_positions)


def keep_columns(X, columns: Sequence, train_rows: np.ndarray, always: Iterable = ()):
    """Keep the columns non-zero in at least one training row, plus every column of the ``always`` features.

    Returns (X_kept, kept_columns, report); the report counts the ``always`` features that are zero in every
    training row (their FM embeddings stay untrained) and lists them as strings.
    """
    train_rows = np.asarray(train_rows, dtype=bool)
    if train_rows.shape != (X.shape[0],):
        raise RefusalScopeError(f"train_rows has shape {train_rows.shape}, expected ({X.shape[0]},)")
    if len(columns) != X.shape[1]:
        raise RefusalScopeError(f"{len(columns)} column keys for a matrix of {X.shape[1]} columns")
    always_set = sorted({Feature.of(f) for f in always})
    if isinstance(columns, ColumnSpace):  # combine's columns: found by arithmetic, only the kept ones built
        where = {f: columns.columns_of(f) for f in always_set}
    else:
        by_feature: dict[Feature, list[int]] = {}
        for i, f in enumerate(column_features(columns)):
            by_feature.setdefault(f, []).append(i)
        where = {f: np.asarray(by_feature[f]) if f in by_feature else None for f in always_set}
    unknown = [str(f) for f, idx in where.items() if idx is None]
    if unknown:
        raise RefusalScopeError(f"features {', '.join(unknown[:5])} are not columns of the matrix "
                                "(wrong layer or latent)")
    Xt = X.tocsr()[train_rows]
    Xt.eliminate_zeros()
    fired = np.bincount(Xt.indices, minlength=X.shape[1]) > 0
    in_always = np.zeros(X.shape[1], dtype=bool)
    for idx in where.values():
        in_always[idx] = True
    kept = np.flatnonzero(fired | in_always)
    never = [f for f in always_set if not fired[where[f]].any()]
    report = {"n_columns_before": int(X.shape[1]), "n_columns_kept": int(len(kept)), "n_always": len(always_set),
              "n_always_never_fire_in_train": len(never), "always_never_fire_in_train": [str(f) for f in never]}
    kept_columns = columns.take(kept) if isinstance(columns, ColumnSpace) else [columns[i] for i in kept]
    return X.tocsr()[:, kept], kept_columns, report


def column_arrays(columns: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(layer, latent) of every column, as int64 arrays (a ``ColumnList``'s own, or read from column objects)."""
    if isinstance(columns, ColumnList):
        return columns.layer.astype(np.int64), columns.latent.astype(np.int64)
    feats = column_features(columns)
    return (np.fromiter((f.layer for f in feats), np.int64, len(feats)),
            np.fromiter((f.latent for f in feats), np.int64, len(feats)))


@dataclass(frozen=True)
class FeatureGroups:
    """The columns of each feature, features in the order of their first column: (``layer``, ``latent``) of each
    feature; ``order`` lists the column indices feature by feature (ascending within one), ``starts`` where each
    feature's run begins and ``counts`` its length."""

    layer: np.ndarray
    latent: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, columns: Sequence) -> "FeatureGroups":
        layer, latent = column_arrays(columns)
        n = len(layer)
        key = layer * (int(latent.max()) + 1 if n else 1) + latent
        if n == 0 or bool((key[1:] >= key[:-1]).all()):  # sorted columns (combine's): runs in place
            order = np.arange(n)
            starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if n else order
            counts = np.diff(np.append(starts, n))
        else:
            by_key = np.argsort(key, kind="stable")  # a feature's columns stay ascending
            ks = key[by_key]
            runs = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
            rank = np.empty(len(runs), dtype=np.int64)
            rank[np.argsort(by_key[runs])] = np.arange(len(runs))  # by each feature's first column
            group = np.repeat(rank, np.diff(np.append(runs, n)))
            order = by_key[np.argsort(group, kind="stable")]
            counts = np.bincount(group, minlength=len(runs))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        at = order[starts]
        return cls(layer[at], latent[at], order, starts, counts)


class FeatureTable(Mapping):
    """Feature → one row of ``data`` (a tensor: its row; an array: a float), without an object per feature:
    features (distinct) are found by their (layer, latent) key. Iterates in the given feature order."""

    def __init__(self, layer: np.ndarray, latent: np.ndarray, data):
        self.layer, self.latent, self.data = np.asarray(layer), np.asarray(latent), data
        if len(self.latent) and int(self.latent.min()) < 0:
            raise RefusalScopeError("a FeatureTable's latents are non-negative")
        self._stride = int(self.latent.max()) + 1 if len(self.latent) else 1
        key = self.layer.astype(np.int64) * self._stride + self.latent
        self._by_key = np.argsort(key, kind="stable")
        self._keys = key[self._by_key]
        if bool((self._keys[1:] == self._keys[:-1]).any()):
            raise RefusalScopeError("a FeatureTable holds each feature once")

    @staticmethod
    def _pair(f) -> tuple[int, int] | None:
        """(layer, latent) of a Feature (or a plain pair of ints); None for anything else."""
        if not isinstance(f, tuple) or len(f) != 2 or not all(isinstance(x, (int, np.integer)) for x in f):
            return None
        return int(f[0]), int(f[1])

    def _row(self, f) -> int | None:
        row = int(self.rows([f])[0])
        return None if row < 0 else row

    def rows(self, features: Sequence[Feature]) -> np.ndarray:
        """The row of each feature (−1 where it has none), in one vectorized lookup."""
        n = len(features)
        pairs = [self._pair(f) or (0, -1) for f in features]
        layer = np.fromiter((p[0] for p in pairs), np.int64, n)
        latent = np.fromiter((p[1] for p in pairs), np.int64, n)
        if not len(self._keys):
            return np.full(n, -1, dtype=np.int64)
        key = layer * self._stride + latent
        at = np.minimum(np.searchsorted(self._keys, key), len(self._keys) - 1)
        found = (latent >= 0) & (latent < self._stride) & (self._keys[at] == key)
        return np.where(found, self._by_key[at], -1)

    def __getitem__(self, f):
        i = self._row(f)
        if i is None:
            raise KeyError(f)
        v = self.data[i]
        return v if isinstance(v, torch.Tensor) else float(v)

    def __eq__(self, other) -> bool:
        """Same features with equal values (tensors compared whole, as a dict of tensors cannot be)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(other) != len(self) or set(other) != set(self):
            return False
        for f in self:
            a, b = self[f], other[f]
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, f) -> bool:
        return self._row(f) is not None

    def __iter__(self):
        return iter([Feature(a, b) for a, b in zip(self.layer.tolist(), self.latent.tolist())])

    def __len__(self) -> int:
        return len(self.layer)


def feature_embeddings(emb, columns: Sequence, groups: FeatureGroups | None = None) -> FeatureTable:
    """One embedding per feature from an FM's per-column embeddings (n_columns, k).

    Our choice: a feature's embedding is the mean of the rows of its kept columns (its kept positions). Features
    with the same number of columns are averaged together, each as ``emb[its columns].mean(dim=0)`` would
    (``feature_embeddings_reference``; the same values, tested), without a Python step per feature. ``groups``:
    ``FeatureGroups.of(columns)`` when the caller has it already."""
    emb = torch.as_tensor(emb)
    if emb.shape[0] != len(columns):
        raise RefusalScopeError(f"{emb.shape[0]} embedding rows for {len(columns)} columns")
    g = groups or FeatureGroups.of(columns)
    means = torch.empty((len(g.layer),) + tuple(emb.shape[1:]), dtype=emb.dtype, device=emb.device)
    for size in np.unique(g.counts).tolist():
        which = np.flatnonzero(g.counts == size)
        rows = g.order[g.starts[which][:, None] + np.arange(size)]  # (features, size) column indices
        means[torch.from_numpy(which).to(emb.device)] = emb[torch.from_numpy(rows).to(emb.device)].mean(dim=1)
    return FeatureTable(g.layer, g.latent, means)


def feature_embeddings_reference(emb, columns: Sequence) -> dict[Feature, torch.Tensor]:
    """``feature_embeddings``, one feature at a time."""
    emb = torch.as_tensor(emb)
    groups: dict[Feature, list[int]] = {}
    for i, col in enumerate(columns):
        groups.setdefault(feature_of_column(col), []).append(i)
    return {f: emb[idx].mean(dim=0) for f, idx in groups.items()}


def feature_max(values, columns: Sequence, groups: FeatureGroups | None = None) -> FeatureTable:
    """Each feature's largest value over its columns (the probe's |w| per feature in "positions" mode); ``groups``
    as for ``feature_embeddings``."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] != len(columns):
        raise RefusalScopeError(f"{values.shape[0]} values for {len(columns)} columns")
    g = groups or FeatureGroups.of(columns)
    best = np.maximum.reduceat(values[g.order], g.starts) if len(g.starts) else values[:0]
    return FeatureTable(g.layer, g.latent, best)
