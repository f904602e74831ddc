"""CE loss (paper, Table 9): masked CE against a token loop, the batched/replayed forward against per-text
references, empty-set ablation = baseline, direction ablation changes CE, and the analysis end to end (files, CLI,
completion cache, resume)."""

from dataclasses import replace

import pandas as pd
import pytest
import torch

from helpers import random_sae
from refusalscope.analysis import ce_loss
from refusalscope.analysis.ce_loss import ChunkedCe, instruction_text, masked_ce, masked_ce_reference, prose_text
from refusalscope.analysis.registry import run_analysis
from refusalscope.interventions.direction import DirectionAblation
from refusalscope.interventions.latents import LatentAblation
from refusalscope.lm.hooks import decoder_layers, hooked
from refusalscope.interventions import hooks_for

INSTRUCTIONS = ["Write a poem about the sea.", "How do I make a cake?", "Give three tips for staying healthy."]
COMPLETIONS = ["Sure, here is a poem about the sea.", "I'm sorry", "The quick brown fox jumps over the lazy dog."]
PROSE = ["The quick brown fox jumps over the lazy dog. Explain how photosynthesis works.",
         "Sure, here is a tutorial on baking bread.", "As an AI, I cannot help with that request. def add(a, b)",
         "Give three tips for staying healthy and write a poem about the sea, verse one and verse two."]


def test_masked_ce_matches_a_token_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=g) * 3
    targets = torch.randint(0, 50, (4, 7), generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[2] = False  # a row without targets
    sums, counts = masked_ce(logits, targets, mask)
    ref_sums, ref_counts = masked_ce_reference(logits, targets, mask)
    assert counts.tolist() == ref_counts and counts[2] == 0
    assert torch.allclose(sums, torch.tensor(ref_sums, dtype=torch.float64), atol=1e-5)
    assert sums[0] > 0


def _texts(lm, max_tokens=40):
    tok = lm.tokenizer
    out = [instruction_text(tok, i, c, max_tokens) for i, c in zip(INSTRUCTIONS, COMPLETIONS)]
    out += [prose_text(tok, p, max_tokens) for p in PROSE]
    assert all(t is not None for t in out)
    return out


def _per_text_reference(lm, texts, interventions=()):
    """One unpadded forward per text with every position's logits; CE summed token by token."""
    sums = []
    for t in texts:
        ids = torch.tensor([t.ids])
        with torch.inference_mode(), hooked(lm.model, hooks_for(list(interventions), lm.n_layers)):
            logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        L = len(t.ids)
        sums.append(sum(-float(torch.log_softmax(logits[p - 1].double(), -1)[t.ids[p]])
                        for p in range(L - t.n_target, L)))
    return torch.tensor(sums, dtype=torch.float64)


def test_texts_put_targets_on_the_completion_and_on_prose_after_the_first_token(tiny_lm):
    tok = tiny_lm.tokenizer
    t = instruction_text(tok, INSTRUCTIONS[0], COMPLETIONS[0], 1000)
    reply = tok(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    assert t.n_target == len(reply) and list(t.ids[-len(reply):]) == reply
    cut = instruction_text(tok, INSTRUCTIONS[0], COMPLETIONS[0], len(t.ids) - 3)
    assert cut.n_target == len(reply) - 3 and cut.ids == t.ids[:-3]
    assert instruction_text(tok, INSTRUCTIONS[0], "", 1000) is None  # nothing to score
    p = prose_text(tok, PROSE[0], 10)
    assert len(p.ids) == 10 and p.n_target == 9


def test_chunked_ce_equals_per_text_reference(tiny_lm):
    texts = _texts(tiny_lm)
    got = ChunkedCe(tiny_lm, texts, batch_size=3).run()[0]
    assert torch.allclose(got, _per_text_reference(tiny_lm, texts), rtol=1e-4, atol=1e-4)


def test_empty_set_ablation_is_the_baseline_exactly_and_direction_ablation_changes_ce(tiny_lm):
    texts = _texts(tiny_lm)
    saes = {layer: random_sae("relu", d=tiny_lm.d_model, m=48, layer=layer, seed=layer) for layer in range(4)}
    runner = ChunkedCe(tiny_lm, texts, batch_size=3)
    base = runner.run()
    assert torch.equal(runner.run(row_sets=[{}], saes=saes), base)
    assert torch.equal(runner.run(row_sets=[{}], saes=saes, replay_layer=2), base)
    r = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(1))
    ablated = runner.run([DirectionAblation(r)])[0]
    assert (ablated - base[0]).abs().max() > 1e-3
    assert torch.allclose(ablated, _per_text_reference(tiny_lm, texts, [DirectionAblation(r)]), rtol=1e-4, atol=1e-4)


def test_replayed_prefix_and_sets_per_forward_give_the_unbatched_ce(tiny_lm):
    texts = _texts(tiny_lm)
    saes = {layer: random_sae("relu", d=tiny_lm.d_model, m=48, layer=layer, seed=layer) for layer in range(4)}
    saes = {layer: replace(s, W_dec=s.W_dec * 20) for layer, s in saes.items()}  # strong enough to change CE
    sets = [{2: [0, 1, 2, 3, 4, 5], 3: [7, 9]}, {2: list(range(10, 30))}, {3: list(range(20))}]
    runner = ChunkedCe(tiny_lm, texts, batch_size=4)
    base = runner.run()[0]
    plain = torch.stack([runner.run([LatentAblation.build(saes, s)])[0] for s in sets])
    assert (plain - base).abs().max() > 1e-3  # the sets do change the CE
    ref = torch.stack([_per_text_reference(tiny_lm, texts, [LatentAblation.build(saes, s)]) for s in sets])
    assert torch.allclose(plain, ref, rtol=1e-4, atol=1e-4)
    for k_set in range(3):  # replaying layers 0..m (m = the set's lowest layer) is exact
        m = min(sets[k_set])
        got = runner.run(row_sets=[sets[k_set]], saes=saes, replay_layer=m)[0]
        assert torch.allclose(got, plain[k_set], rtol=1e-5, atol=1e-5)
    batched = runner.run(k=3, row_sets=sets, saes=saes, replay_layer=2)  # one set per block of rows
    assert torch.allclose(batched, plain, rtol=1e-4, atol=1e-4)
    for c in range(len(runner.chunks)):
        runner.clean_output(c, 2)
    ran = []  # with the clean prefix cached, layers 0..m do not compute
    handles = [decoder_layers(tiny_lm.model)[i].mlp.register_forward_hook(lambda *a, i=i: ran.append(i))
               for i in range(4)]
    try:
        runner.run(row_sets=[sets[1]], saes=saes, replay_layer=2)
        assert sorted(set(ran)) == [3]
        ran.clear()
        runner.run(row_sets=[sets[1]], saes=saes)
        assert sorted(set(ran)) == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()


# ---- the analysis -------------------------------------------------------------------------------------------------

FAKE_PROSE = ["The quick brown fox jumps over the lazy dog. Explain how photosynthesis works.",
              "Sure, here is a tutorial on baking bread. Write a poem about the sea.",
              "Give three tips for staying healthy. How do I make a cake?"]


@pytest.fixture
def fake_prose(monkeypatch):
    import refusalscope.prose as prose

    calls = []

    def fake(n, seed=0, **kw):
        calls.append((n, seed))
        return FAKE_PROSE[:n]

    monkeypatch.setattr(prose, "prose_passages", fake)
    return calls


def _settings(run, **kw):
    from refusalscope.config import CeSettings

    return CeSettings(**{"run": run, "device": "cpu", "n_instructions": 4, "n_prose": 3, "max_tokens": 48,
                         "batch_size": 3, **kw})


def test_ce_analysis_writes_every_file(finished_run, fake_prose):
    from refusalscope.analysis.finished_run import FinishedRun
    from refusalscope.data import load_prompts
    from refusalscope.stages.context import CompletionCache

    run, judge = finished_run
    finished = FinishedRun(run, judge=judge)
    summary = run_analysis("ce", _settings(run), progress=False, judge=judge)
    out = run / "analyses" / "ce"
    for name in ("ce.parquet", "ce_table.parquet", "summary.json", "parts/baseline.json",
                 "parts/direction_ablation.json"):
        assert (out / name).exists(), name
    rows = pd.read_parquet(out / "ce.parquet")
    assert list(rows.columns) == ["condition", "set_id", "n_features", "corpus", "n_texts", "n_tokens", "mean_ce"]
    assert set(rows.corpus) == {"instructions", "prose"}
    n2 = sum(1 for rec in finished.records if finished.stage2_set(rec))
    n3 = sum(1 for rec in finished.records if finished.stage3_set(rec.id))
    assert n2 > 0 and n3 > 0
    assert (rows.condition == "stage2_ablation").sum() == 2 * n2
    assert (rows.condition == "stage3_ablation").sum() == 2 * n3
    assert rows[rows.condition == "baseline"].set_id.isna().all()
    assert set(rows[rows.condition == "stage2_ablation"].set_id) == {r.id for r in finished.records
                                                                      if finished.stage2_set(r)}
    assert (rows.n_texts[rows.corpus == "prose"] == 3).all() and (rows.mean_ce > 0).all()
    table = pd.read_parquet(out / "ce_table.parquet")
    assert {"condition", "corpus", "mean", "sd", "n_sets"} <= set(table.columns)
    s2 = table[(table.condition == "stage2_ablation") & (table.corpus == "prose")].iloc[0]
    per_set = rows[(rows.condition == "stage2_ablation") & (rows.corpus == "prose")].mean_ce
    assert s2.n_sets == n2 and s2["mean"] == pytest.approx(per_set.mean()) and s2.sd == pytest.approx(per_set.std())
    base = rows[(rows.condition == "baseline") & (rows.corpus == "instructions")].mean_ce.iloc[0]
    direction = rows[(rows.condition == "direction_ablation") & (rows.corpus == "instructions")].mean_ce.iloc[0]
    assert direction != base
    assert summary["table"]["baseline"]["prose"]["n_sets"] == 1
    assert "no reference answers" in summary["note"] and "public domain" in summary["prose"]["licence"]
    lines = ce_loss.summary_lines(summary)
    assert any(line.startswith("stage2_ablation") and "±" in line for line in lines)
    assert any("no reference answers" in line for line in lines)
    # the unablated completions are in the run's completion cache, under the empty set's key
    ctx = finished.context(device="cpu", max_new_tokens=finished.config["max_new_tokens"])
    prompts = load_prompts("harmless_test", data_dir=finished.data_dir, limit=4).texts
    keys = [CompletionCache.key(p, (), ctx.generation_settings) for p in prompts]
    assert set(CompletionCache(run / "completions.sqlite").get_many(keys)) == set(keys)


def test_ce_analysis_resumes_from_its_parts(finished_run, fake_prose, monkeypatch):
    run, judge = finished_run
    first = run_analysis("ce", _settings(run, max_sets=2, sets=["stage2"]), progress=False, judge=judge)
    parts = run / "analyses" / "ce" / "parts"
    assert len(list(parts.glob("stage2_ablation-*.json"))) == 2 and not list(parts.glob("stage3*"))
    assert first["skipped_sets"]["stage2"]["over_max_sets"] >= 0

    calls = []
    real_run = ChunkedCe.run

    def counting(self, *a, **kw):
        calls.append(kw.get("k", 1))
        return real_run(self, *a, **kw)

    def no_generation(*a, **kw):
        raise AssertionError("completions should come from the cache")

    monkeypatch.setattr(ChunkedCe, "run", counting)
    monkeypatch.setattr(ce_loss, "generate", no_generation)
    again = run_analysis("ce", _settings(run, max_sets=2, sets=["stage2"]), progress=False, judge=judge)
    assert calls == [] and again["table"] == first["table"]  # nothing recomputed, model not even loaded
    victim = sorted(parts.glob("stage2_ablation-*.json"))[0]
    victim.unlink()
    third = run_analysis("ce", _settings(run, max_sets=2, sets=["stage2"]), progress=False, judge=judge)
    assert calls == [1] and victim.exists()  # only the missing part
    assert third["table"]["stage2_ablation"]["prose"]["mean"] == pytest.approx(
        first["table"]["stage2_ablation"]["prose"]["mean"], rel=1e-6)
    calls.clear()
    run_analysis("ce", _settings(run, max_sets=2, sets=["stage2"], max_tokens=40), progress=False, judge=judge)
    assert len(calls) == 4  # other options: every part is stale (baseline, direction, 2 sets)


def test_ce_cli(finished_run, fake_prose, capsys):
    from refusalscope import cli

    run, _ = finished_run
    code = cli.main(["analyze", "ce", "--run", str(run), "--device", "cpu", "--n-instructions", "3", "--n-prose", "2",
                     "--max-tokens", "40", "--max-sets", "1", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "CE loss" in out and "baseline" in out and "direction_ablation" in out and "stage2_ablation" in out
    assert (run / "analyses" / "ce" / "ce_table.parquet").exists()
    assert fake_prose[-1] == (2, 0)
    rows = pd.read_parquet(run / "analyses" / "ce" / "ce.parquet")
    assert (rows.condition == "stage2_ablation").sum() == 2  # one set, two corpora


def test_unablated_completions_are_eager_and_keyed_so_when_the_run_compiles(tiny_lm, monkeypatch):
    """A run that compiles generation still gets CE's unablated completions from eager decoding (a hook-free
    compiled step would be a graph of its own), cached under a key without "compiled"; a second call reads them."""
    from helpers import FakeJudge
    from refusalscope.lm import inference
    from refusalscope.stages.context import CompletionCache, StageContext

    calls = []

    def spy(lm, instructions, **kw):
        calls.append(kw.get("compile", "off"))
        return inference.generate(lm, instructions, **kw)

    monkeypatch.setattr(ce_loss, "generate", spy)
    saes = {1: random_sae("relu", d=tiny_lm.d_model, m=24, layer=1)}
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=4, batch_size=8, cache=CompletionCache(),
                       compile="aot_eager")
    assert ctx.generation_settings.get("compiled") == "aot_eager"
    outs = ce_loss.unablated_completions(ctx, INSTRUCTIONS)
    assert calls == ["off"]
    assert outs == inference.generate(tiny_lm, INSTRUCTIONS, max_new_tokens=4, batch_size=8, progress=False)
    eager = {k: v for k, v in ctx.generation_settings.items() if k != "compiled"}
    keys = [CompletionCache.key(p, (), eager) for p in INSTRUCTIONS]
    assert set(ctx.cache.get_many(keys)) == set(keys)
    assert ce_loss.unablated_completions(ctx, INSTRUCTIONS) == outs and calls == ["off"]  # read from the cache
