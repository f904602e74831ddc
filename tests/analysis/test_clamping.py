"""Clamping (analysis/clamping.py): a clamp at a known token changes the residual by exactly (v − z)·W_dec there and
nowhere else; sites carried from the hydra prompt to a benign one; the analysis' tables, cache reuse and fallback."""

import pandas as pd
import pytest
import torch

from helpers import FakeJudge, random_sae, verdict
from refusalscope.analysis import clamping
from refusalscope.analysis.clamping import Site, clamp_interventions, fired_site, resolve
from refusalscope.analysis.registry import run_analysis
from refusalscope.config import ClampSettings
from refusalscope.interventions.latents import LatentClamp
from refusalscope.lm.hooks import Hook
from refusalscope.lm.inference import generate, length_sorted_batches, map_last_logits
from refusalscope.lm.prompts import format_chat
from refusalscope.saes.features import Feature
from refusalscope.store import RunStore

PROMPTS = ["Write a poem about the sea.", "Tell me how to pick a lock.", "hi"]


def _resid(lm, layer, interventions=()):
    """resid_post of ``layer`` (after any edit there) for PROMPTS, rows in PROMPTS order, and each prompt's length."""
    seen = {}
    map_last_logits(lm, PROMPTS, lambda x: x, batch_size=len(PROMPTS), progress=False, interventions=interventions,
                    extra_hooks=[Hook("resid_post", layer, lambda h: seen.update(h=h.detach().float().clone()))])
    order = next(length_sorted_batches(format_chat(lm.tokenizer, PROMPTS), lm.tokenizer, len(PROMPTS)))
    h = torch.empty_like(seen["h"])
    h[torch.tensor(order)] = seen["h"]
    return h


def test_clamp_at_known_tokens_changes_exactly_those_positions(tiny_lm):
    lm = tiny_lm
    saes = {1: random_sae("relu", d=lm.d_model, m=24, layer=1, seed=1),
            2: random_sae("relu", d=lm.d_model, m=24, layer=2, seed=2)}
    a, b, c = Feature(1, 4), Feature(1, 17), Feature(2, 9)
    rows = [(2.0, {a: -1, b: -3}), (10.0, {a: -1, b: -1}), (4.0, {c: -2})]  # one row per prompt
    ivs = clamp_interventions(saes, rows)
    assert {(iv.value, iv.positions) for iv in ivs} == {(2.0, (-1,)), (2.0, (-3,)), (10.0, (-1,)), (4.0, (-2,))}
    clean, edited = _resid(lm, 1), _resid(lm, 1, ivs)
    T = clean.shape[1]
    z = saes[1].encode(clean)  # what the SAE reads before the edit
    W = saes[1].W_dec
    want = clean.clone()
    want[0, T - 1] += (2.0 - z[0, T - 1, a.latent]) * W[a.latent]  # by hand, one latent at a time
    want[0, T - 3] += (2.0 - z[0, T - 3, b.latent]) * W[b.latent]
    want[1, T - 1] += (10.0 - z[1, T - 1, a.latent]) * W[a.latent] + (10.0 - z[1, T - 1, b.latent]) * W[b.latent]
    assert torch.allclose(edited, want, atol=1e-5)
    changed = (edited != clean).any(-1)
    assert changed.nonzero().tolist() == [[0, T - 3], [0, T - 1], [1, T - 1]]  # nowhere else, bit for bit
    # the layer-2 clamp of row 2: its layer-2 input is clean (nothing upstream in that row), so the same formula
    clean2, edited2 = _resid(lm, 2), _resid(lm, 2, ivs)
    want2 = clean2[2].clone()
    want2[T - 2] += (4.0 - saes[2].encode(clean2[2, T - 2])[c.latent]) * saes[2].W_dec[c.latent]
    assert torch.allclose(edited2[2], want2, atol=1e-5)
    assert torch.equal(edited2[2, :T - 2], clean2[2, :T - 2])


def test_sites_carry_to_a_benign_prompt():
    # a 20-token hydra prompt: 3 template tokens before the instruction, 5 after it
    after = fired_site(Feature(1, 1), 17, 20, 3, 5)
    assert after == Site(Feature(1, 1), "end", -3)
    assert resolve(after, 12, 3) == -3 and resolve(after, 40, 3) == -3  # the same template token
    before = fired_site(Feature(1, 1), 1, 20, 3, 5)
    assert before == Site(Feature(1, 1), "start", 1)
    assert resolve(before, 12, 3) == 1 - 12  # index 1 from the first real token
    inside = fired_site(Feature(1, 1), 8, 20, 3, 5, segment="user")
    assert inside == Site(Feature(1, 1), "end", -12)
    assert resolve(inside, 30, 3) == -12 and resolve(inside, 12, 3) == -9  # clipped to the instruction's start
    assert fired_site(Feature(1, 1), 8, 20, 3, 5, segment="system").anchor == "start"  # hydra's segment wins
    assert fired_site(Feature(1, 1), -2, 20, 3, 5) == Site(Feature(1, 1), "end", -2)
    assert resolve(Site(Feature(1, 1), "first"), 12, 3) == -12


def test_template_lengths_frame_the_instruction(tiny_lm):
    tok = tiny_lm.tokenizer
    n_prefix, n_suffix = clamping.template_lengths(tok)
    ids = tok.encode(format_chat(tok, ["Write a poem about the sea."])[0], add_special_tokens=False)
    assert tok.decode(ids[n_prefix:len(ids) - n_suffix]) == "Write a poem about the sea."
    assert clamping.n_tokens(tok, "Write a poem about the sea.") == len(ids)


def _hydra(run, woken, tokens=None, dormant=None):
    store = RunStore(run)
    store.write_table("analyses/hydra/woken.parquet", pd.DataFrame(woken, columns=[
        "id", "set", "feature", "layer", "latent", "max_act", "n_positions", "top_token", "top_position"]))
    if tokens is not None:
        store.write_table("analyses/hydra/tokens.parquet", pd.DataFrame(tokens))
    if dormant is not None:
        store.write_table("analyses/hydra/dormant.parquet", pd.DataFrame(dormant))
    store.write_json("analyses/hydra/summary.json", {"analysis": "hydra"})


def parity_judge():
    return FakeJudge(lambda p, c: verdict(len(c) % 2 == 0), "parity")


def test_clamp_analysis_tables_cache_and_rerun(finished_run, monkeypatch):
    run, _ = finished_run
    _hydra(run, [{"id": 0, "set": "stage2", "feature": "L2/5", "layer": 2, "latent": 5, "max_act": 1.0,
                  "n_positions": 1, "top_token": "x", "top_position": 3},
                 {"id": 1, "set": "stage2", "feature": "L3/9", "layer": 3, "latent": 9, "max_act": 2.0,
                  "n_positions": 2, "top_token": "y", "top_position": 12}],
           tokens=[{"id": 0, "set": "stage2", "feature": "L2/5", "position": 3, "token": "x", "segment": "template",
                    "activation": 1.0},
                   {"id": 1, "set": "stage2", "feature": "L3/9", "position": 11, "token": "y", "segment": "user",
                    "activation": 0.5},
                   {"id": 1, "set": "stage2", "feature": "L3/9", "position": 12, "token": "y", "segment": "user",
                    "activation": 2.0}])
    judge = parity_judge()
    settings = ClampSettings(run=run, values=[2, 10], n_prompts=2, device="cpu")
    summary = run_analysis("clamp", settings, progress=False, judge=judge)
    out = run / "analyses" / "clamp"
    table = pd.read_parquet(out / "completions.parquet")
    assert {"mode", "value", "prompt", "completion", "refused", "degenerate", "judge"} <= set(table.columns)
    assert len(table) == 2 + 2 * 2 * 2 and set(table.judge) == {"parity"}
    assert table.refused.tolist() == [len(c) % 2 == 0 for c in table.completion]
    rates = pd.read_parquet(out / "refusal_rates.parquet")
    clamped = rates[rates["mode"] != "none"]
    assert sorted(zip(clamped["mode"], clamped.value)) == [("fired", 2.0), ("fired", 10.0), ("first", 2.0),
                                                             ("first", 10.0)]
    for r in rates.itertuples():
        part = table[(table["mode"] == r.mode) & ((table.value == r.value) | (table.value.isna() & pd.isna(r.value)))]
        assert r.n == 2 and r.refusal_rate == pytest.approx(part.refused.mean())
    assert summary["source"] == "woken" and summary["features"] == ["L2/5", "L3/9"] and summary["judge"] == "parity"

    sites = pd.read_parquet(out / "sites.parquet").set_index("feature")
    assert sites.loc["L2/5", "anchor"] == "start" and sites.loc["L2/5", "offset"] == 3
    assert sites.loc["L3/9", "position"] == 12 and sites.loc["L3/9", "anchor"] == "end"  # highest activation

    from refusalscope.analysis.finished_run import FinishedRun

    fr = FinishedRun(run, judge=judge)
    benign = table[table["mode"] == "none"].prompt.tolist()
    ctx = fr.context(layers=[2, 3])
    plain = generate(ctx.lm, benign, max_new_tokens=ctx.max_new_tokens, progress=False)
    assert table[table["mode"] == "none"].completion.tolist() == plain  # the unclamped completions
    # the batched, left-padded clamps give what one prompt at a time gives with hand-placed LatentClamps
    sets = {2: [5], 3: [9]}
    first = generate(ctx.lm, benign, max_new_tokens=ctx.max_new_tokens, progress=False,
                     interventions=[LatentClamp.build(ctx.saes, sets, 10.0, positions="first")])
    assert table[(table["mode"] == "first") & (table.value == 10)].completion.tolist() == first
    end = int(sites.loc["L3/9", "offset"])
    fired = [generate(ctx.lm, [p], max_new_tokens=ctx.max_new_tokens, progress=False,
                      interventions=[LatentClamp.build(ctx.saes, {2: [5]}, 10.0, positions=[3]),
                                     LatentClamp.build(ctx.saes, {3: [9]}, 10.0, positions=[end])])[0]
             for p in benign]
    assert table[(table["mode"] == "fired") & (table.value == 10)].completion.tolist() == fired

    # rerun: every completion comes from the run's completion cache
    monkeypatch.setattr(clamping, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = run_analysis("clamp", settings, progress=False, judge=judge)
    assert again["refusal_rate"] == summary["refusal_rate"]
    assert pd.read_parquet(out / "completions.parquet").completion.tolist() == table.completion.tolist()
    lines = "\n".join(clamping.summary_lines(summary))
    assert "judge parity" in lines and "first token" in lines


def test_clamp_falls_back_to_dormant_features(finished_run):
    run, _ = finished_run
    _hydra(run, [], dormant=[{"id": 0, "set": "stage2", "feature": "L1/6"}, {"id": 1, "set": "stage2",
                                                                           "feature": "L1/8"}])
    summary = run_analysis("clamp", ClampSettings(run=run, values=[4], n_prompts=1, modes=["fired"], device="cpu"),
                           progress=False, judge=parity_judge())
    assert summary["source"] == "dormant" and summary["features"] == ["L1/6", "L1/8"]
    assert summary["fired_without_position"] == 2  # dormant: never fired, clamped at the last token
    assert "dormant features were clamped instead" in "\n".join(clamping.summary_lines(summary))
    sites = pd.read_parquet(run / "analyses" / "clamp" / "sites.parquet")
    assert set(zip(sites.anchor, sites.offset)) == {("end", -1)}
