"""Hydra analysis: token segments, the batched recorder (and its scope-"all" wake bookkeeping) against the plain
formula, a planted dormant feature that only fires once an upstream feature is ablated (edge found, positions as
computed by hand) and a planted latent outside the set that only scope "all" reports, resumption through the
per-prompt files and the completion cache, and the command end to end on a finished tiny run."""

import json
import shutil
from dataclasses import replace

import networkx as nx
import pandas as pd
import pytest
import torch

from helpers import FakeJudge, analysis_alone_and_grouped, differences_beyond_rounding, random_sae
from refusalscope.analysis import hydra, hydra_graph
from refusalscope.analysis.clamping import firings as clamp_firings
from refusalscope.analysis.clamping import redundant_features
from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.analysis.registry import run_analysis
from refusalscope.cli import main
from refusalscope.config import HydraSettings
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions.latents import reference_ablate
from refusalscope.lm.hooks import Hook, hooked
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.segments import SEGMENTS
from refusalscope.saes.features import Feature
from refusalscope.stages.context import StageContext

PROMPT = "Tell me how to pick a lock."

def _random_saes(d: int, arch: str) -> dict:
    return {layer: random_sae(arch, d=d, m=24, layer=layer, seed=10 + layer) for layer in (1, 2, 3)}


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_batched_recording_matches_the_plain_formula(tiny_lm, arch):
    saes = _random_saes(tiny_lm.d_model, arch)
    features = [Feature(1, 3), Feature(2, 0), Feature(2, 7), Feature(3, 5), Feature(3, 11)]
    sets = [[], [Feature(1, 1)], [Feature(1, 1), Feature(1, 4), Feature(2, 2)], [Feature(2, 3), Feature(3, 5)],
            [Feature(3, 1)]]
    got = hydra.record_under_ablations(tiny_lm, saes, PROMPT, sets, features, batch_size=2)
    for row, s in enumerate(sets):
        want = hydra.record_reference(tiny_lm, saes, PROMPT, s, features)
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-4)
    assert got[0].abs().sum() > 0  # something fires, so the comparison says something


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_batched_wakes_match_the_plain_formula(tiny_lm, arch):
    """Scope "all": the sparse in-hook bookkeeping (clean row in the first batch, later batches against its peaks)
    finds exactly the latents two separate unbatched forwards find, with the same activations."""
    saes = _random_saes(tiny_lm.d_model, arch)
    features = [Feature(2, 0), Feature(3, 5)]
    peak = {layer: z.amax(0) for layer, z in hydra.reference_codes(
        tiny_lm, saes, PROMPT, (), [1, 2, 3]).items()}
    on = {layer: [Feature(layer, i) for i in torch.argsort(p, descending=True)[:3].tolist()]
          for layer, p in peak.items()}
    assert all(peak[f.layer][f.latent] > 0 for fs in on.values() for f in fs)  # ablating them changes the stream
    sets = [on[1][:2], [], [on[1][2], on[2][0]], on[2][1:], on[3][:2]]
    got = hydra.record_with_wakes(tiny_lm, saes, PROMPT, sets, features, wake_layers=[1, 2, 3], batch_size=2)
    torch.testing.assert_close(got.acts, hydra.record_under_ablations(tiny_lm, saes, PROMPT, sets, features))
    n = 0
    for row, s in enumerate(sets):
        want = hydra.reference_wakes(tiny_lm, saes, PROMPT, s, [1, 2, 3])
        fs, acts = got.wakes[row]
        assert fs == sorted(want), (row, fs, sorted(want))
        for j, f in enumerate(fs):
            torch.testing.assert_close(acts[:, j], want[f], atol=1e-5, rtol=1e-4)
            assert f.layer > min(x.layer for x in s) and want[f].max() > 0
        n += len(fs)
    assert n > 0 and got.wakes[1][0] == [] and got.wakes[4][0] == []  # something woke; nothing without a cause


# ---- a planted hydra feature ----------------------------------------------------------------------------------

A, A2 = Feature(1, 2), Feature(2, 5)  # active on the prompt
B2, B, C = Feature(2, 1), Feature(3, 4), Feature(3, 6)  # dormant: B2 and B read -d_A, C never fires
OUTSIDE = Feature(3, 7)  # outside every set: reads -d_A like B, woken by A's ablation (scope "all" only)
MARGIN = 0.3


def _residuals(lm, hooks=()):
    """resid_post of every layer, read before any edit on that layer (hand computation)."""
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [PROMPT]))
    seen = {}
    rec = [Hook("resid_post", layer, lambda h, layer=layer: seen.__setitem__(layer, h[0].float().clone()))
           for layer in range(lm.n_layers)]
    with torch.inference_mode(), hooked(lm.model, [*rec, *hooks]):
        lm.model(**batch)
    return seen


def _set(t: torch.Tensor, idx, value):
    t = t.clone()
    t[idx] = value
    return t


def planted_saes(lm, max_norm=None) -> dict:
    """Layer 1: A = ReLU(40 h·u), decoder d_A. Layer 2: A2 = 0.05 everywhere (decoder ⊥ d_A), B2 = ReLU(-h·d_A + b).
    Layer 3: B = ReLU(-h·d_A + b), C = ReLU(-1), OUTSIDE = ReLU(-2 h·d_A + b) (latent 7). The biases b put B2, B
    and OUTSIDE ``MARGIN`` below their clean maximum, so they fire only where ablating A pushed the stream along
    -d_A."""
    d = lm.d_model
    g = torch.Generator().manual_seed(1)
    u, d_a, v = (torch.randn(d, generator=g) for _ in range(3))
    u, d_a = u / u.norm(), d_a / d_a.norm()
    v = v - (v @ d_a) * d_a
    v = v / v.norm()
    clean = _residuals(lm)
    saes = {layer: random_sae("relu", d=d, m=8, layer=layer, seed=layer, max_norm=max_norm) for layer in (1, 2, 3)}
    s1, s2, s3 = saes[1], saes[2], saes[3]
    saes[1] = replace(s1, W_enc=_set(s1.W_enc, (slice(None), 2), 40 * u), b_enc=_set(s1.b_enc, 2, 0.0),
                      W_dec=_set(s1.W_dec, 2, d_a))
    w2 = _set(_set(s2.W_enc, (slice(None), 5), 0.0), (slice(None), 1), -d_a)
    b2 = _set(_set(s2.b_enc, 5, 0.05), 1, -float((clean[2] @ -d_a).max()) - MARGIN)
    saes[2] = replace(s2, W_enc=w2, b_enc=b2, W_dec=_set(s2.W_dec, 5, v))
    w3 = _set(_set(_set(s3.W_enc, (slice(None), 4), -d_a), (slice(None), 6), 0.0), (slice(None), 7), -2 * d_a)
    b3 = _set(_set(s3.b_enc, 4, -float((clean[3] @ -d_a).max()) - MARGIN), 6, -1.0)
    b3 = _set(b3, 7, -float((clean[3] @ (-2 * d_a)).max()) - MARGIN)
    saes[3] = replace(s3, W_enc=w3, b_enc=b3)
    return saes


def _by_hand(lm, saes, ablate: dict[int, list[int]]) -> dict[Feature, list[int]]:
    """Positions where B2 and B fire with ``ablate`` (layer → latents) replaced by the paper's formula."""
    hooks = [Hook("resid_post", layer, lambda h, sae=saes[layer], ids=ids: reference_ablate(sae, h, ids).to(h.dtype))
             for layer, ids in ablate.items()]
    seen = _residuals(lm, hooks)
    out = {}
    for f in (B2, B):
        z = saes[f.layer].encode(seen[f.layer])[:, f.latent]
        out[f] = torch.nonzero(z > 0).flatten().tolist()
    return out


def test_planted_dormant_feature_is_woken_and_gets_its_edge(tiny_lm):
    saes = planted_saes(tiny_lm)
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(refused=True), max_new_tokens=3, batch_size=8)
    res = hydra.analyse_prompt(ctx, 7, PROMPT, {"stage2": [A, A2, B2, B, C]}, settings={"k": 1})
    (s,) = res.sets
    assert s.dormant == [B2, B, C] and s.active == [A, A2]
    assert not s.jailbroken_full and not s.jailbroken_without_dormant and s.judge == "always"

    full = _by_hand(tiny_lm, saes, {1: [2], 2: [5]})
    assert full[B] and len(full[B]) < len(res.tokens)  # the planted feature fires on some tokens, not all
    woken = {w.feature: w for w in s.woken}
    assert set(woken) == {B2, B}
    for f in (B2, B):
        assert woken[f].positions == full[f]
    # layer-blocks: ablating A alone wakes both; ablating A2 alone wakes nothing later than layer 2
    blocks = {b.layer: b for b in s.blocks}
    assert sorted(blocks) == [1, 2] and blocks[1].ablated == [A] and blocks[2].ablated == [A2]
    alone = _by_hand(tiny_lm, saes, {1: [2]})
    assert {w.feature: w.positions for w in blocks[1].woken} == {f: alone[f] for f in (B2, B)}
    assert blocks[2].woken == []

    frames = hydra.tables([res], "activation")
    tok = frames["tokens"]
    assert set(zip(tok.feature, tok.position)) == {(str(f), p) for f in (B2, B) for p in full[f]}
    assert list(tok.segment) == [res.segments[p] for p in tok.position]
    assert list(tok.token) == [res.tokens[p] for p in tok.position]
    wk = frames["woken"].set_index("feature")
    shares = wk[[f"share_{g}" for g in SEGMENTS]]
    assert ((shares.sum(axis=1) - 1).abs() < 1e-6).all()
    mass = tok[tok.feature == str(B)].groupby("segment").activation.sum() / tok[tok.feature == str(B)].activation.sum()
    for g, share in mass.items():
        assert wk.loc[str(B), f"share_{g}"] == pytest.approx(share)
    assert wk.loc[str(B), "n_positions"] == len(full[B])
    counted = hydra.tables([res], "count")["segments"].set_index(["set", "segment"])
    assert counted.loc[("all", "user"), "share"] == pytest.approx(
        (tok.segment == "user").sum() / len(tok))

    g = hydra_graph.build_graph(frames["edges"], roles=hydra_graph.feature_roles([res]))
    assert set(g.edges) == {(str(A), str(B2)), (str(A), str(B))}
    assert g.nodes[str(A)]["role"] == "active" and g.nodes[str(B)]["role"] == "dormant"
    assert g.nodes[str(B)]["layer"] == 3 and g.edges[str(A), str(B)]["n_prompts"] == 1
    assert g.edges[str(A), str(B)]["mean_weight"] == pytest.approx(max(w.max_act for w in blocks[1].woken
                                                                       if w.feature == B))
    summary = hydra.summarize([res], frames, g, "activation")
    assert summary["sink_note"] is None and summary["woken"] == 2 and summary["dormant"] == 3


def test_scope_all_adds_the_latent_outside_the_set(tiny_lm):
    saes = planted_saes(tiny_lm)
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(refused=True), max_new_tokens=3, batch_size=8)
    sets = {"stage2": [A, A2, B2, B, C]}
    only_set = hydra.analyse_prompt(ctx, 7, PROMPT, sets, settings={}, wake_scope="set")
    res = hydra.analyse_prompt(ctx, 7, PROMPT, sets, settings={}, wake_scope="all")
    (s,) = res.sets
    # the paper's scope is untouched by the extra bookkeeping (its extra rows change batch shapes: floats to rounding)
    assert not differences_beyond_rounding(s.model_dump(include={"woken", "blocks"}),
                                           only_set.sets[0].model_dump(include={"woken", "blocks"}))
    assert OUTSIDE not in {w.feature for w in s.woken} and only_set.sets[0].woken_all == []
    # scope "all": exactly what two plain forwards say, the set's dormant features and OUTSIDE included
    full = hydra.reference_wakes(tiny_lm, saes, PROMPT, [A, A2], [1, 2, 3])
    assert {w.feature for w in s.woken_all} == set(full) and {B2, B, OUTSIDE} <= set(full) and C not in full
    woken_all = {w.feature: w for w in s.woken_all}
    assert woken_all[OUTSIDE].positions == torch.nonzero(full[OUTSIDE] > 0).flatten().tolist()
    assert woken_all[OUTSIDE].max_act == pytest.approx(float(full[OUTSIDE].max()), rel=1e-4)
    blocks = {b.layer: b for b in s.blocks_all}
    assert sorted(blocks) == [1, 2] and blocks[1].ablated == [A] and blocks[2].ablated == [A2]
    alone = hydra.reference_wakes(tiny_lm, saes, PROMPT, [A], [2, 3])
    assert {w.feature for w in blocks[1].woken} == set(alone) and OUTSIDE in alone
    assert {w.feature for w in blocks[2].woken} == set(hydra.reference_wakes(tiny_lm, saes, PROMPT, [A2], [3]))

    frames = hydra.tables([res], "activation")
    wk = frames["woken"]
    assert set(wk[wk.scope == "set"].feature) == {str(B2), str(B)}
    assert set(wk[wk.scope == "all"].feature) == {str(f) for f in full}
    tok = frames["tokens"]
    assert set(tok[(tok.scope == "all") & (tok.feature == str(OUTSIDE))].position) == set(woken_all[OUTSIDE].positions)
    assert set(frames["segments"].scope) == {"set", "all"}
    g_set = hydra_graph.build_graph(frames["edges"], scope="set", roles=hydra_graph.feature_roles([res]))
    g_all = hydra_graph.build_graph(frames["edges"], scope="all", roles=hydra_graph.feature_roles([res]))
    assert set(g_set.edges) == {(str(A), str(B2)), (str(A), str(B))}
    assert (str(A), str(OUTSIDE)) in g_all.edges and not any(str(OUTSIDE) in e for e in g_set.edges)
    assert set(g_set.edges) <= set(g_all.edges)
    assert g_all.edges[str(A), str(OUTSIDE)]["mean_weight"] == pytest.approx(float(alone[OUTSIDE].max()), rel=1e-4)
    assert g_all.nodes[str(OUTSIDE)]["role"] == "outside" and g_all.nodes[str(B)]["role"] == "dormant"
    summary = hydra.summarize([res], frames, {"set": g_set, "all": g_all}, "activation")
    assert summary["woken"] == summary["scopes"]["set"]["woken"] == 2
    assert summary["scopes"]["all"]["woken_features"] == len(full)
    assert summary["scopes"]["all"]["graph"]["edges"] == g_all.number_of_edges()
    lines = hydra.summary_lines(summary)
    assert any(line.startswith("scope all:") for line in lines) and any("graph_all.graphml" in x for x in lines)


def test_sink_note_only_for_saes_with_max_norm(tiny_lm):
    saes = planted_saes(tiny_lm, max_norm=1e6)  # bound never reached: same activations, note still due
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(refused=False), max_new_tokens=3, batch_size=8)
    res = hydra.analyse_prompt(ctx, 0, PROMPT, {"stage2": [A, B]}, settings={})
    assert res.max_norm_layers == [1, 3]
    frames = hydra.tables([res])
    summary = hydra.summarize([res], frames, hydra_graph.build_graph(frames["edges"]), "activation")
    assert "first-token share is 0 by construction" in summary["sink_note"] and "1,3" in summary["sink_note"]
    assert any(line.startswith("note:") for line in hydra.summary_lines(summary))


# ---- the command on a finished run ----------------------------------------------------------------------------

FILES = ["summary.json", "dormant.parquet", "jailbreak.parquet", "woken.parquet", "tokens.parquet", "segments.parquet",
         "edges.parquet", "graph.graphml", "graph.json", "graph.png", "graph_all.graphml", "graph_all.json"]


def test_rerun_reuses_finished_prompts_and_cached_completions(finished_run, monkeypatch):
    run, judge = finished_run
    first = run_analysis("hydra", HydraSettings(run=run, device="cpu"), progress=False, judge=judge)
    n = len(FinishedRun(run).records)
    assert first["prompts"] == n and first["reused"] == 0 and first["judge"] == judge.name
    prompts = sorted((run / "analyses/hydra/prompts").glob("*.json"))
    assert len(prompts) == n
    before = {p.name: p.read_text() for p in prompts}

    def boom(*a, **k):
        raise AssertionError("recomputed")

    with monkeypatch.context() as m:  # every prompt is finished: no model, no forward
        m.setattr(hydra, "hydra_flow", boom)
        m.setattr(FinishedRun, "context", boom)
        again = run_analysis("hydra", HydraSettings(run=run, device="cpu"), progress=False, judge=judge)
    assert again["reused"] == n and {k: again[k] for k in ("dormant", "woken", "graph")} == \
        {k: first[k] for k in ("dormant", "woken", "graph")}

    shutil.rmtree(run / "analyses/hydra/prompts")
    with monkeypatch.context() as m:  # forwards again, but every completion comes from completions.sqlite
        m.setattr("refusalscope.stages.context.generate", boom)
        third = run_analysis("hydra", HydraSettings(run=run, device="cpu"), progress=False, judge=judge)
    assert third["reused"] == 0
    assert {p.name: p.read_text() for p in (run / "analyses/hydra/prompts").glob("*.json")} == before

    changed = run_analysis("hydra", HydraSettings(run=run, device="cpu", threshold=0.01), progress=False, judge=judge)
    assert changed["reused"] == 0  # other settings: recomputed
    narrow = run_analysis("hydra", HydraSettings(run=run, device="cpu", threshold=0.01, wake_scope="set"),
                          progress=False, judge=judge)
    assert narrow["reused"] == 0 and narrow["wake_scope"] == "set" and list(narrow["scopes"]) == ["set"]
    assert set(pd.read_parquet(run / "analyses/hydra/woken.parquet").scope) <= {"set"}
    assert nx.read_graphml(run / "analyses/hydra/graph_all.graphml").number_of_edges() == 0  # no stale "all" graph


def test_cli_writes_every_file(finished_run, monkeypatch, capsys):
    run, judge = finished_run
    monkeypatch.setattr("refusalscope.analysis.finished_run.make_judge", lambda name: judge)
    assert main(["analyze", "hydra", "--run", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "hydra:" in out and f"judge {judge.name}" in out and "graph" in out
    base = run / "analyses/hydra"
    for name in FILES:
        assert (base / name).is_file(), name
    summary = json.loads((base / "summary.json").read_text())
    assert summary["analysis"] == "hydra" and summary["options"]["sets"] == ["stage2", "stage3"]
    jail = pd.read_parquet(base / "jailbreak.parquet")
    assert set(jail.set) <= {"stage2", "stage3"} and len(jail) == summary["sets"]
    assert (jail.judge == judge.name).all()
    assert int(jail.n_dormant.sum()) == summary["dormant"] == len(pd.read_parquet(base / "dormant.parquet"))
    assert list(pd.read_parquet(base / "tokens.parquet").columns) == ["id", "set", "scope", "feature", "position",
                                                                       "token", "segment", "activation"]
    woken = pd.read_parquet(base / "woken.parquet")
    assert {"feature", "scope", "max_act", "top_token", "share_first", "share_post_instruction"} <= set(woken.columns)
    in_set = woken[woken.scope == "set"]
    assert summary["wake_scope"] == "all" and len(in_set) == summary["woken"]
    assert (woken.scope == "all").sum() == summary["scopes"]["all"]["woken"] > len(in_set)
    assert set(map(tuple, in_set[["id", "set", "feature"]].values)) <= \
        set(map(tuple, woken[woken.scope == "all"][["id", "set", "feature"]].values))
    segs = pd.read_parquet(base / "segments.parquet")
    assert set(segs.segment) == set(SEGMENTS) and set(segs.scope) == {"set", "all"}
    for scope, name in hydra.GRAPH_FILES.items():
        g = nx.read_graphml(base / f"{name}.graphml")
        h = nx.node_link_graph(json.loads((base / f"{name}.json").read_text()), edges="edges")
        assert set(g.edges) == set(h.edges) and g.number_of_edges() == summary["scopes"][scope]["graph"]["edges"]
    assert summary["graph"] == summary["scopes"]["set"]["graph"]
    assert "scope all:" in out
    # the sets' own woken features only: scope "all" latents are not pipeline or redundant features
    finished = FinishedRun(run)
    groups = finished.pipeline_features()
    assert {f for f, g in groups.items() if "hydra" in g} == {Feature.parse(f) for f in in_set.feature}
    outside = {Feature.parse(f) for f in woken.feature} - {Feature.parse(f) for f in in_set.feature}
    assert outside and not any("hydra" in groups.get(f, ()) for f in outside)
    redundant, source = redundant_features(finished)
    assert not outside & set(redundant)
    assert source == "dormant" or redundant == sorted({Feature.parse(f) for f in in_set.feature})
    assert not outside & set(clamp_firings(finished, sorted(outside)))


def _firings_plain(acts, features, threshold):
    """The per-column loop ``hydra.firings`` vectorizes."""
    out = []
    for j, f in enumerate(features):
        col = acts[:, j]
        pos = torch.nonzero(col > threshold).flatten().tolist()
        if pos:
            out.append(hydra.Firing(feature=f, max_act=float(col.max()), positions=pos,
                                    activations=[float(col[p]) for p in pos]))
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_firings_match_a_loop_over_the_columns(threshold):
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(9, 40, generator=g)) * (torch.rand(9, 40, generator=g) < 0.2)
    acts[:, 3] = 0  # a column that never fires
    acts[:, 7] = 2.0  # one that fires everywhere
    features = [Feature(2 + j % 3, 10 * j) for j in range(40)]
    got = hydra.firings(acts, features, threshold)
    want = _firings_plain(acts, features, threshold)
    assert 0 < len(got) < 40
    assert [w.model_dump(mode="json") for w in got] == [w.model_dump(mode="json") for w in want]
    assert all(isinstance(w.feature, Feature) for w in got)
    assert hydra.firings(acts[:, :0], [], threshold) == [] and hydra.firings(acts * 0, features, threshold) == []


def test_no_sets_is_one_clear_error(finished_run):
    run, judge = finished_run
    with pytest.raises(RefusalScopeError, match="names no feature set"):
        run_analysis("hydra", HydraSettings(run=run, sets=[]), progress=False, judge=judge)


def test_prompts_in_groups_give_the_results_of_one_at_a_time(finished_run, monkeypatch, tmp_path):
    """--prompt-batch: a group's sets are generated in one call, and every prompt's file is the one it gets
    analysed alone."""
    run, judge = finished_run
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    for r in (run, alone):  # nothing cached: every set is generated here
        (r / "completions.sqlite").unlink()
    n = len(FinishedRun(run).records)
    assert n >= 2
    (calls_alone, files_alone), (calls, files) = analysis_alone_and_grouped(monkeypatch, run, alone, judge, "hydra",
                                                                            HydraSettings)
    assert len(calls_alone) == n and [len(c) for c in calls] == [sum(len(c) for c in calls_alone)]
    assert len(files) == n and files == files_alone
