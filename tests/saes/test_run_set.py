"""saes.json holds no machine-specific path: a cached set is recorded as cache:REL, a set inside the run as run:REL,
both found again after the run (and the cache) moved; the absolute form of older runs still loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import random_sae
from refusalscope.errors import RefusalScopeError
from refusalscope.saes.run_set import load_run_saes, portable_spec, record_sae_set, resolve_spec, same_sae_set
from refusalscope.saes.saelens_io import save_sae
from refusalscope.store import RunStore


def _save_set(root, layers=(1, 2)):
    for layer in layers:
        save_sae(random_sae("relu", d=32, m=48, layer=layer, seed=layer), root / f"layer_{layer}")
    return root


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].W_dec, b[k].W_dec) for k in a)


def test_a_cached_set_is_recorded_by_its_place_in_the_cache_and_found_in_another_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "cache-a"))
    set_dir = _save_set(tmp_path / "cache-a" / "saes" / "tiny" / "0123abcd")
    store = RunStore(tmp_path / "run-a")
    record_sae_set(store, str(set_dir), [1, 2], {"kind": "trained"})
    rec = store.read_json("saes.json")
    assert rec["spec"] == "cache:saes/tiny/0123abcd"
    assert str(tmp_path) not in store.path("saes.json").read_text()
    first = load_run_saes(store)

    # the run and the cache move (another machine: another HOME and cache location)
    shutil.move(str(tmp_path / "run-a"), str(tmp_path / "elsewhere"))
    shutil.move(str(tmp_path / "cache-a"), str(tmp_path / "cache-b"))
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "cache-b"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    moved = RunStore(tmp_path / "elsewhere", create=False)
    assert resolve_spec(moved, rec["spec"]) == str(tmp_path / "cache-b" / "saes" / "tiny" / "0123abcd")
    assert _same_weights(load_run_saes(moved), first)

    # a cache without the set: one line saying what to copy where
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RefusalScopeError, match="not in this machine's cache .*saes/tiny/0123abcd"):
        load_run_saes(moved)


def test_a_set_inside_the_run_is_recorded_relative_to_it(tmp_path):
    store = RunStore(tmp_path / "run")
    _save_set(store.path("my-saes"))
    record_sae_set(store, str(store.path("my-saes")), [1, 2])
    assert store.read_json("saes.json")["spec"] == "run:my-saes"
    first = load_run_saes(store)
    shutil.move(str(store.root), str(tmp_path / "moved"))
    moved = RunStore(tmp_path / "moved", create=False)
    assert _same_weights(load_run_saes(moved), first)
    # --saes naming the set by its path (where the run now lies) or as recorded is the same set
    assert same_sae_set(moved, str(moved.path("my-saes")), "run:my-saes")
    assert same_sae_set(moved, "run:my-saes", "run:my-saes")
    assert not same_sae_set(moved, str(_save_set(tmp_path / "other")), "run:my-saes")


def test_other_specs_are_kept_as_given(tmp_path):
    store = RunStore(tmp_path / "run")
    user_dir = _save_set(tmp_path / "user-saes")
    assert portable_spec(store, str(user_dir)) == str(user_dir)
    assert portable_spec(store, "gemmascope-res-16k") == "gemmascope-res-16k"
    assert portable_spec(store, "saelens:rel:layer_{layer}/x") == "saelens:rel:layer_{layer}/x"


def test_the_absolute_cache_path_of_an_older_run_still_loads(tmp_path, monkeypatch):
    # an older saes.json recorded the cache path of the machine that trained the set
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path / "cache"))
    _save_set(tmp_path / "cache" / "saes" / "tiny" / "0123abcd")
    store = RunStore(tmp_path / "run")
    old = "/home/someone/.cache/refusalscope/saes/tiny/0123abcd"
    store.path("saes.json").write_text(json.dumps({"spec": old, "layers": [1, 2], "kind": "trained"}))
    assert sorted(load_run_saes(store)) == [1, 2]
    # and where it still exists, the recorded path is used as it is
    here = _save_set(tmp_path / "kept" / "saes" / "tiny" / "0123abcd", layers=(1,))
    store.path("saes.json").write_text(json.dumps({"spec": str(here), "layers": [1], "kind": "trained"}))
    assert resolve_spec(store, str(here)) == str(here)
