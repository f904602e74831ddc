"""The annotations of a run: one SQLite file, ``RUN/annotations.sqlite``.

Tables: ``meta`` (the stored sample's options, the categories, the page-token secret), ``items`` (the sample, in
its stored order, with each feature's hidden source), ``annotators`` and ``answers`` (UNIQUE(annotator, feature)).
The sample is drawn once and kept, so restarts and later option changes never reorder it. Every answer is written in
its own transaction the moment it is given; ``submit`` checks it against the annotator's next feature inside that
transaction (``BEGIN IMMEDIATE``), so concurrent annotators never lose or overwrite answers and a duplicate or
out-of-order submit changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pandas as pd

from refusalscope.annotate.sampling import annotator_order

FILE = "annotations.sqlite"
MAX_NAME = 64
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (position INTEGER PRIMARY KEY, feature TEXT NOT NULL UNIQUE, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (name TEXT PRIMARY KEY, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    annotator TEXT NOT NULL REFERENCES annotators(name),
    feature TEXT NOT NULL REFERENCES items(feature),
    categories TEXT NOT NULL,
    answered REAL NOT NULL,
    UNIQUE (annotator, feature)
);
"""


class AnnotationError(ValueError):
    """A rejected input: ``message`` for the annotator, ``status`` for the HTTP reply; nothing was stored."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def clean_name(name: str | None) -> str:
    """An annotator name, whitespace collapsed; empty, over-long or control-character names are rejected."""
    text = " ".join(unicodedata.normalize("NFC", name or "").split())
    if not text:
        raise AnnotationError("enter your name to start")
    if len(text) > MAX_NAME:
        raise AnnotationError(f"a name has at most {MAX_NAME} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise AnnotationError("a name cannot contain control characters")
    return text


class AnnotationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cache: dict | None = None
        with self._connect() as db:
            # our choice: WAL, so pages keep reading while an answer is written; every commit is still synced
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self):
        """One write transaction, taken before anything is read, so checks and the write see the same state."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- the sample ---------------------------------------------------------------------------------------------

    def initialise(self, items: Sequence[tuple[str, str]], categories: Sequence[str], options: dict) -> bool:
        """Store the sample, categories and options unless a sample is stored already; True when this call did."""
        with self._write() as db:
            if db.execute("SELECT COUNT(*) FROM items").fetchone()[0]:
                return False
            db.executemany("INSERT INTO items (position, feature, source) VALUES (?, ?, ?)",
                           [(i, f, s) for i, (f, s) in enumerate(items)])
            meta = {"categories": json.dumps(list(categories)), "options": json.dumps(options, sort_keys=True),
                    "secret": secrets.token_hex(16), "created": str(time.time())}
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            return True

    def _fixed(self) -> dict:
        """The sample, categories, options and secret: written once by ``initialise``, so read once."""
        if self._cache is None:
            with self._connect() as db:
                items = [(f, s) for f, s in db.execute("SELECT feature, source FROM items ORDER BY position")]
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            fixed = {"items": items, "options": json.loads(meta.get("options", "{}")),
                     "categories": json.loads(meta.get("categories", "[]")), "secret": meta.get("secret", "")}
            if not items:  # not initialised yet: read again next time
                return fixed
            self._cache = fixed
        return self._cache

    @property
    def options(self) -> dict:
        return dict(self._fixed()["options"])

    @property
    def categories(self) -> list[str]:
        return list(self._fixed()["categories"])

    def items(self) -> list[tuple[str, str]]:
        """The sample as [(feature, source)] in stored order."""
        return list(self._fixed()["items"])

    def order(self, name: str) -> list[str]:
        fixed = self._fixed()
        opts = fixed["options"]
        return list(_order(tuple(f for f, _ in fixed["items"]), int(opts.get("seed", 0)), name,
                           opts.get("order", "per-annotator") == "shared"))

    def token(self, name: str, feature: str) -> str:
        """The page token of (annotator, feature): what a submit must carry back."""
        secret = self._fixed()["secret"]
        return hmac.new(secret.encode(), f"{name}\0{feature}".encode(), hashlib.sha256).hexdigest()[:20]

    # ---- annotators and answers ----------------------------------------------------------------------------------

    def register(self, name: str) -> str:
        name = clean_name(name)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO annotators (name, started) VALUES (?, ?)", (name, time.time()))
        return name

    def annotator(self, raw: str | None) -> str:
        """The cleaned name of a registered annotator; AnnotationError (404 when unknown) otherwise."""
        name = clean_name(raw)
        if not self.known(name):
            raise AnnotationError(f"unknown annotator {name!r}: enter your name to start", 404)
        return name

    def known(self, name: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone() is not None

    def answered(self, name: str, db=None) -> set[str]:
        if db is None:
            with self._connect() as db:
                return self.answered(name, db)
        return {f for (f,) in db.execute("SELECT feature FROM answers WHERE annotator = ?", (name,))}

    def next_feature(self, name: str, db=None) -> tuple[int, str | None]:
        """(how many this annotator answered, their next feature or None when done)."""
        done = self.answered(name, db)
        nxt = next((f for f in self.order(name) if f not in done), None)
        return len(done), nxt

    def submit(self, name: str, feature: str, token: str, categories: Sequence[str], none: bool) -> None:
        """Store one answer, or raise ``AnnotationError`` and store nothing. ``none`` is the 'None of these' box;
        it excludes every category."""
        name = clean_name(name)
        feature = str(feature or "")
        valid = set(self.categories)
        picked = list(dict.fromkeys(str(c) for c in categories))
        unknown = [c for c in picked if c not in valid]
        if unknown:
            raise AnnotationError(f"unknown category: {', '.join(unknown)}")
        if none and picked:
            raise AnnotationError("tick categories or 'None', not both")
        if not none and not picked:
            raise AnnotationError("tick at least one category, or 'None'")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise AnnotationError(f"unknown annotator {name!r}: start from the first page")
            if not db.execute("SELECT 1 FROM items WHERE feature = ?", (feature,)).fetchone():
                raise AnnotationError(f"unknown feature {feature!r}")
            if db.execute("SELECT 1 FROM answers WHERE annotator = ? AND feature = ?", (name, feature)).fetchone():
                raise AnnotationError(f"{feature} is already answered; your first answer is kept", 409)
            if not hmac.compare_digest(str(token or ""), self.token(name, feature)):
                raise AnnotationError("this page is stale or was not issued to you; reload to get your next feature",
                                      409)
            _, nxt = self.next_feature(name, db)
            if feature != nxt:
                raise AnnotationError(f"{feature} is not your next feature (that is {nxt}); nothing was saved", 409)
            db.execute("INSERT INTO answers (annotator, feature, categories, answered) VALUES (?, ?, ?, ?)",
                       (name, feature, json.dumps(sorted(picked)), time.time()))

    def answers(self) -> pd.DataFrame:
        """Every answer: annotator, feature, source, categories (list; empty = None), answered (unix time)."""
        with self._connect() as db:
            rows = db.execute("SELECT a.annotator, a.feature, i.source, a.categories, a.answered FROM answers a "
                              "JOIN items i ON i.feature = a.feature ORDER BY a.answered, a.rowid").fetchall()
        return pd.DataFrame([(a, f, s, json.loads(c), t) for a, f, s, c, t in rows],
                            columns=["annotator", "feature", "source", "categories", "answered"])

    def progress(self) -> list[tuple[str, int]]:
        """(annotator, answers given) for everyone who started."""
        with self._connect() as db:
            return db.execute("SELECT n.name, COUNT(a.feature) FROM annotators n LEFT JOIN answers a "
                              "ON a.annotator = n.name GROUP BY n.name ORDER BY n.started").fetchall()


@lru_cache(maxsize=256)
def _order(features: tuple[str, ...], seed: int, name: str, shared: bool) -> tuple[str, ...]:
    return tuple(annotator_order(features, seed, name, shared))

