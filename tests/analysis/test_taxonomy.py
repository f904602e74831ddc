"""Taxonomy (analysis/taxonomy.py): a planted token-specific latent maps to exactly its category; batched activations
equal the one-prompt path; CoCoNot categories, random features of the same layers, the analysis' tables."""

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from helpers import random_sae
from refusalscope.analysis import taxonomy
from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.analysis.registry import run_analysis
from refusalscope.config import TaxonomySettings
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.hooks import Hook, hooked
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature, active_features

SAFETY = "Requests with safety concerns"
# the tiny tokenizer has a token "ick" (in "pick", "quick"); only the "locks" prompts contain it
CATEGORIES = {
    "locks": ["Tell me how to pick a lock.", "How do I pick a lock quick?", "Pick the lock for me.",
              "Explain how to pick locks."],
    "cake": ["How do I make a cake?", "Write a poem about the sea.", "Give three tips for staying healthy.",
             "Explain how photosynthesis works."],
    "files": ["Write a script that deletes files.", "def add(a, b): return a + b", "The lazy dog sleeps.",
              "As an AI, I cannot help."],
}


def write_coconot(folder, categories=CATEGORIES, extra=()):
    rows = [{"id": f"{c}{i}", "subset": "original", "category": SAFETY, "subcategory": c, "prompt": p}
            for c, ps in categories.items() for i, p in enumerate(ps)]
    rows += list(extra)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "coconot.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def planted_sae(lm, layer: int, token: str, prompts, latent: int = 3, width: int = 16):
    """A random ReLU SAE whose ``latent`` fires exactly on the positions holding ``token`` (the mean-difference
    direction of those residuals, thresholded half-way between the two sides)."""
    marker = lm.tokenizer.convert_tokens_to_ids(token)
    hs, hits = [], []
    for p in prompts:
        batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [p]))
        seen = {}
        with torch.inference_mode(), hooked(lm.model, [Hook("resid_post", layer, lambda h: seen.update(h=h[0]))]):
            lm.model(**batch)
        hs.append(seen["h"].float())
        hits.append(batch["input_ids"][0] == marker)
    h, hit = torch.cat(hs), torch.cat(hits)
    u = h[hit].mean(0) - h[~hit].mean(0)
    lo, hi = float((h[~hit] @ u).max()), float((h[hit] @ u).min())
    assert hit.any() and lo < hi, "the planted direction must separate the token (builder precondition)"
    sae = random_sae("relu", d=lm.d_model, m=width, layer=layer, seed=layer)
    W_enc, b_enc = sae.W_enc.clone(), sae.b_enc.clone()
    W_enc[:, latent], b_enc[latent] = u, -(lo + hi) / 2
    return replace(sae, W_enc=W_enc, b_enc=b_enc)


def test_planted_token_feature_maps_to_exactly_its_category(tiny_lm, tmp_path):
    cats = taxonomy.load_categories(write_coconot(tmp_path) / "coconot.jsonl")
    assert cats == CATEGORIES
    prompts = [p for c in sorted(cats) for p in cats[c]]
    labels = [c for c in sorted(cats) for _ in cats[c]]
    sae = planted_sae(tiny_lm, 1, "ick", prompts)
    planted = Feature(1, 3)
    others = [Feature(1, i) for i in range(16) if i != 3]
    features = sorted([planted, *others])
    acts = taxonomy.max_activations(tiny_lm, {1: sae}, prompts, features, batch_size=5)
    counts = taxonomy.prompt_counts(acts, labels, sorted(cats))
    mapped = taxonomy.mapped_categories(counts, sorted(cats))
    j = features.index(planted)
    assert mapped[j] == ["locks"]
    assert counts[j].tolist() == [0, 0, 4]  # cake, files, locks: every "locks" prompt holds the token
    assert taxonomy.mapped_categories(counts, sorted(cats), min_prompts=5)[j] == []
    sizes = [len(cats[c]) for c in sorted(cats)]
    assert taxonomy.mapped_categories(counts, sorted(cats), min_share=1.0, sizes=sizes)[j] == ["locks"]
    # a share threshold only removes categories, and the sweep's 0 row is the paper's rule
    strict = taxonomy.mapped_categories(counts, sorted(cats), min_share=0.5, sizes=sizes)
    assert all(set(a) <= set(b) for a, b in zip(strict, mapped))
    is_pipeline = torch.tensor([f == planted for f in features])
    sweep = taxonomy.share_sweep(counts, sizes, is_pipeline)
    paper = sweep[(sweep.min_share == 0) & (sweep.source == "random")].iloc[0]
    assert paper.multi == sum(len(m) >= 2 for f, m in zip(features, mapped) if f != planted)
    assert sweep[(sweep.min_share == 0) & (sweep.source == "pipeline")].iloc[0].single == 1
    # a random latent of the same SAE that fires broadly maps to several categories (the contrast)
    assert any(len(m) >= 2 for m in mapped)


def _pad_tuned(lm, sae, prompt, latent):
    """``sae`` with ``latent`` off on every token of ``prompt`` but on at a zero residual, which is what left-padding
    positions hold in these models: counting padding would give the prompt an activation it does not have."""
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]))
    seen = {}
    with torch.inference_mode(), hooked(lm.model, [Hook("resid_post", sae.layer, lambda h: seen.update(h=h[0]))]):
        lm.model(**batch)
    h = seen["h"].float()
    w = torch.linalg.lstsq(h, -torch.ones(h.shape[0], 1)).solution[:, 0]  # h·w = -1 on every token
    assert (h @ w).max() < -0.5, "the prompt's residuals must be separable from 0 (builder precondition)"
    W_enc, b_enc = sae.W_enc.clone(), sae.b_enc.clone()
    W_enc[:, latent], b_enc[latent] = w, 0.5
    return replace(sae, W_enc=W_enc, b_enc=b_enc)


def test_batched_activations_equal_one_prompt_path(tiny_lm):
    prompts = [p for ps in CATEGORIES.values() for p in ps]  # mixed lengths: left padding must not count
    shortest = min(prompts, key=lambda p: len(tiny_lm.tokenizer.tokenize(p)))
    saes = {0: _pad_tuned(tiny_lm, random_sae("relu", d=tiny_lm.d_model, m=24, layer=0), shortest, 7),
            2: random_sae("topk", d=tiny_lm.d_model, m=24, layer=2, seed=2)}
    features = [Feature(0, 1), Feature(0, 7), Feature(2, 0), Feature(2, 5), Feature(2, 23)]
    acts = taxonomy.max_activations(tiny_lm, saes, prompts, features, batch_size=4, positions="all")
    for i, p in enumerate(prompts):
        ref = active_features(tiny_lm, p, saes, features)
        assert acts[i].tolist() == pytest.approx([ref[f] for f in features], abs=1e-5)
    assert (acts[:, :2] > 0).any() and (acts[:, 2:] > 0).any()
    assert acts[prompts.index(shortest), 1] == 0  # the padding-tuned latent: padding never counts
    # the user's text only: batched equals one prompt at a time, never above all positions, and strictly below
    # somewhere (template tokens fire too)
    user = taxonomy.max_activations(tiny_lm, saes, prompts, features, batch_size=4, positions="user")
    alone = taxonomy.max_activations(tiny_lm, saes, prompts, features, batch_size=1, positions="user")
    assert torch.allclose(user, alone, atol=1e-5)
    assert (user <= acts + 1e-6).all() and (user < acts - 1e-6).any()


def test_categories_levels_caps_and_errors(tmp_path):
    extra = [{"id": "x1", "subset": "original", "category": "Incomplete requests", "subcategory": "underspecified",
              "prompt": "Do it."},
             {"id": "x2", "subset": "original", "category": SAFETY, "subcategory": "tiny", "prompt": "One only."},
             {"id": "x3", "subset": "contrast", "category": SAFETY, "subcategory": "locks", "prompt": "Fix my lock."}]
    path = write_coconot(tmp_path, extra=extra) / "coconot.jsonl"
    sub = taxonomy.load_categories(path, min_category_prompts=2)
    assert sorted(sub) == ["cake", "files", "locks"]  # 1-prompt "tiny" dropped, contrast rows ignored
    assert "Fix my lock." not in sum(sub.values(), [])
    top = taxonomy.load_categories(path, level="category")
    assert sorted(top) == ["Incomplete requests", SAFETY] and len(top[SAFETY]) == 13
    capped = taxonomy.load_categories(path, max_per_category=2, seed=1)
    assert all(len(v) <= 2 for v in capped.values())
    assert capped == taxonomy.load_categories(path, max_per_category=2, seed=1)  # seeded
    assert set(capped["locks"]) <= set(CATEGORIES["locks"])
    with pytest.raises(RefusalScopeError, match="needs CoCoNot"):
        taxonomy.load_categories(tmp_path / "missing.jsonl")


def test_random_features_match_layers_and_avoid_pipeline():
    pipeline = [Feature(1, 0), Feature(1, 5), Feature(3, 2)]
    rand = taxonomy.random_features(pipeline, {1: 8, 3: 4}, seed=3)
    assert sorted(f.layer for f in rand) == [1, 1, 3]
    assert not set(rand) & set(pipeline)
    assert rand == taxonomy.random_features(pipeline, {1: 8, 3: 4}, seed=3)
    assert len({tuple(taxonomy.random_features(pipeline, {1: 8, 3: 4}, seed=s)) for s in range(6)}) > 1


def test_taxonomy_analysis_tables_and_reuse(finished_run, tmp_path, monkeypatch):
    run, judge = finished_run
    data = write_coconot(tmp_path / "data")
    settings = TaxonomySettings(run=run, data_dir=str(data), device="cpu", min_category_prompts=1)
    summary = run_analysis("taxonomy", settings, progress=False, judge=judge)
    out = run / "analyses" / "taxonomy"
    table = pd.read_parquet(out / "features.parquet")
    assert {"feature", "layer", "latent", "group", "categories", "n_categories", "prompt_counts"} <= set(table.columns)
    groups = FinishedRun(run).pipeline_features()
    pipe = table[table.source == "pipeline"]
    rand = table[table.source == "random"]
    assert sorted(pipe.feature) == sorted(str(f) for f in groups)
    for row in pipe.itertuples():
        assert row.group == ",".join(groups[Feature.parse(row.feature)])
    assert sorted(rand.layer) == sorted(pipe.layer) and not set(rand.feature) & set(pipe.feature)
    for row in table.itertuples():
        assert list(row.categories) == [c for c in sorted(CATEGORIES) if row.prompt_counts[c] >= 1]
        assert row.n_categories == len(row.categories)
        if row.source == "random":
            assert row.group == ("random_active" if row.n_categories else "random_inactive")
    counts = pd.read_parquet(out / "counts.parquet")
    assert counts.groupby("source").n_features.sum().to_dict() == {"pipeline": len(pipe), "random": len(rand)}
    assert summary["pipeline"]["multi"] == int((pipe.n_categories >= 2).sum())
    assert summary["pipeline"]["single"] == int((pipe.n_categories == 1).sum())
    assert summary["judge"] is None and (out / "taxonomy.png").stat().st_size > 0
    assert "no judge" in "\n".join(taxonomy.summary_lines(summary))

    # rerun: the recorded activations are reused, no forward pass
    monkeypatch.setattr(taxonomy, "max_activations", lambda *a, **k: pytest.fail("activations recomputed"))
    assert run_analysis("taxonomy", settings, progress=False, judge=judge)["pipeline"] == summary["pipeline"]


def test_missing_coconot_fails_before_loading(finished_run, tmp_path, monkeypatch):
    run, judge = finished_run
    monkeypatch.setattr(FinishedRun, "context", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(RefusalScopeError, match="coconot.jsonl"):
        run_analysis("taxonomy", TaxonomySettings(run=run, data_dir=str(tmp_path)), progress=False, judge=judge)
