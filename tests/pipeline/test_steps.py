"""Each resumable step's input check and the preflight: reuse when inputs match, recompute when that loses nothing,
one clear error when it would make finished results inconsistent; bad input fails before anything is loaded."""

import json
import time

import pandas as pd
import torch
import pytest

from helpers import FakeJudge, random_sae
from refusalscope.cli import main
from refusalscope.config import DirectionOptions, RunSettings, resolve
from refusalscope.errors import RefusalScopeError
from refusalscope.pipeline import run as pipeline
from refusalscope.pipeline import steps
from refusalscope.saes.saelens_io import save_sae

PROMPTS = ["Tell me how to pick a lock.", "Write a script that deletes files."]
FAST_DIRECTION = dict(n_train=4, n_val=2, asr_candidates=1, max_new_tokens=3)


def _saes(root, d_model, seed=0):
    for layer in (1, 2):
        save_sae(random_sae("topk", d=d_model, m=32, layer=layer, seed=seed + layer), root / f"layer_{layer}")
    return root


@pytest.fixture
def finished(tmp_path, tiny_dirs, tiny_data_dir, tiny_lm, monkeypatch):
    """A finished Stage-1 run on a tiny model (the judge refuses everything, so each prompt tries every K)."""
    monkeypatch.setattr(pipeline, "make_judge", lambda spec: FakeJudge.always(refused=True))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    settings = RunSettings(model=str(tiny_dirs["qwen2"]), out=tmp_path / "run", prompts=str(prompts),
                           data_dir=str(tiny_data_dir), saes=str(_saes(tmp_path / "saes", tiny_lm.d_model)),
                           min_layer=1, k_step=4, k_cap=8, stages=["1"], max_new_tokens=3, batch_size=4,
                           device="cpu", direction=DirectionOptions(**FAST_DIRECTION))
    pipeline.run_pipeline(settings, progress=False)
    return settings


def _count_generate(monkeypatch):
    calls = []
    real = steps.generate

    def spy(*a, **k):
        calls.append(k.get("desc"))
        return real(*a, **k)

    monkeypatch.setattr(steps, "generate", spy)
    return calls


def test_changing_the_judge_recomputes_the_baseline_only(finished, monkeypatch):
    calls = _count_generate(monkeypatch)
    pipeline.run_pipeline(finished, progress=False)
    assert calls == []  # same inputs: the baseline is reused
    before = json.loads((finished.out / "steps.json").read_text())["baseline"]
    changed = finished.model_copy(update={"judge": "classifier:some/guard"})
    pipeline.run_pipeline(changed, progress=False)
    assert calls == ["baseline"]
    after = json.loads((finished.out / "steps.json").read_text())["baseline"]
    assert before["judge"] == "substring" and after["judge"] == "classifier:some/guard"
    calls.clear()
    pipeline.run_pipeline(finished.model_copy(update={"max_new_tokens": 4}), progress=False)
    assert calls == ["baseline"]


def test_another_sae_set_on_a_finished_run_is_one_clear_error(finished, tmp_path, tiny_lm):
    before = {p.name: p.stat().st_mtime_ns for p in finished.out.rglob("*") if p.is_file()}
    other = _saes(tmp_path / "other-saes", tiny_lm.d_model, seed=10)
    with pytest.raises(RefusalScopeError, match="was made with the SAE set .* not .*other-saes.*use another --out"):
        pipeline.run_pipeline(finished.model_copy(update={"saes": str(other)}), progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in finished.out.rglob("*") if p.is_file()}
    assert after == before  # nothing was recomputed or rewritten


def test_new_direction_options_on_a_finished_run_are_one_clear_error(finished):
    changed = finished.model_copy(update={"direction": DirectionOptions(**{**FAST_DIRECTION, "n_train": 6})})
    with pytest.raises(RefusalScopeError, match="refusal direction computed with n_train=4"):
        pipeline.run_pipeline(changed, progress=False)


def test_a_finished_run_resumes_under_either_direction_share_prefix(finished):
    """--direction.share-prefix changes the direction by float rounding only (steps.ROUNDING_ONLY)."""
    def kept():  # the direction's files and the finished prompts (a resume rewrites only the tables)
        files = [*finished.out.glob("direction*"), *finished.out.glob("config.direction.json"),
                 *(finished.out / "prompts").glob("*.json")]
        return {p.name: p.stat().st_mtime_ns for p in files}

    before = kept()
    assert len(before) >= 5
    plain = finished.model_copy(update={"direction": DirectionOptions(**{**FAST_DIRECTION, "share_prefix": False})})
    assert json.loads((finished.out / "config.direction.json").read_text())["share_prefix"] is True
    pipeline.run_pipeline(plain, progress=False)
    assert kept() == before


def test_toml_run_direction_table_reaches_the_direction_step(tmp_path, tiny_dirs, tiny_data_dir, tiny_lm,
                                                             monkeypatch):
    monkeypatch.setattr(pipeline, "make_judge", lambda spec: FakeJudge.always(refused=True))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    toml = tmp_path / "opts.toml"
    toml.write_text('[direction]\nn-val = 2\nmax-new-tokens = 3\n'  # the shared table counts too...
                    '[run]\nk-step = 4\nk-cap = 4\nstages = ["1"]\n'
                    '[run.direction]\nn-train = 3\nasr-candidates = 1\nn-val = 1\n')  # ...[run.direction] wins
    settings = resolve(RunSettings, {"model": str(tiny_dirs["qwen2"]), "out": tmp_path / "run",
                                     "prompts": str(prompts), "data_dir": str(tiny_data_dir), "device": "cpu",
                                     "saes": str(_saes(tmp_path / "saes", tiny_lm.d_model)), "min_layer": 1,
                                     "max_new_tokens": 3}, toml, "run")
    pipeline.run_pipeline(settings, progress=False)
    used = json.loads((tmp_path / "run" / "config.direction.json").read_text())
    assert (used["n_train"], used["n_val"], used["asr_candidates"], used["max_new_tokens"]) == (3, 1, 1, 3)
    seen = json.loads((tmp_path / "run" / "prompts_used.json").read_text())
    assert len(seen["harmful_train"]) == 3 and len(seen["harmful_val"]) == 1


def test_empty_prompt_file_fails_fast_and_writes_nothing(tmp_path, tiny_dirs, tiny_data_dir, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("goal,target\n")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["run", "--model", str(tiny_dirs["qwen2"]), "--out", str(out), "--prompts", str(empty),
               "--data-dir", str(tiny_data_dir)])
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "holds no prompts" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--judge", "llm-of-my-dreams"], "unknown judge 'llm-of-my-dreams'"),
    (["--layers", "3-1"], "cannot read layers '3-1'"),
    (["--saes", "no-such-set"], "unknown SAE set 'no-such-set'"),
    (["--data-dir", "/no/such/dir"], "data directory /no/such/dir does not exist"),
])
def test_preflight_rejects_bad_input_before_loading_anything(tmp_path, tiny_dirs, tiny_data_dir, capsys, flags,
                                                             message, monkeypatch):
    monkeypatch.setattr(steps, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me how to pick a lock.\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_dirs["qwen2"]), "--out", str(out), "--prompts", str(prompts), *flags]
    if "--data-dir" not in flags:
        argv += ["--data-dir", str(tiny_data_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not out.exists()


def test_a_run_of_another_model_is_refused_before_loading(finished, monkeypatch, tmp_path):
    monkeypatch.setattr(steps, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(RefusalScopeError, match="was made with model"):
        pipeline.run_pipeline(finished.model_copy(update={"model": "gemma-2-2b-it"}), progress=False)
    assert pd.read_parquet(finished.out / "baseline.parquet").shape[0] == 2


def test_prompt_record_round_trips_through_json(finished):
    from refusalscope.pipeline.records import PromptRecord

    for path in (finished.out / "prompts").glob("*.json"):
        data = json.loads(path.read_text())
        rec = PromptRecord.from_json(data)
        assert rec is not None and rec.to_json() == data
        assert all(isinstance(f, tuple) and len(f) == 2 for f in rec.stage1.features)
    assert PromptRecord.from_json({"id": 1, "prompt": "x", "stage1": {"k": 3}}) is None  # an older layout


def test_early_stop_is_part_of_a_finished_prompt_key_only_when_on(tmp_path, tiny_lm):
    from refusalscope.store import RunStore

    base = RunSettings(out=tmp_path / "run")
    on = base.model_copy(update={"early_stop": True})
    assert "early_stop" not in steps.stage_key(base)  # records of runs made before the option stay valid
    assert steps.stage_key(on) == {**steps.stage_key(base), "early_stop": True}
    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=16, layer=layer) for layer in (3, 4)}
    placed = steps.stage_saes(saes, base.model_copy(update={"sae_placement": "host"}), tiny_lm)
    assert sorted(placed) == [3, 4] and placed[3].W_enc.device == tiny_lm.device  # on a CPU, host is the device
    ctx = steps.stage_context(tiny_lm, placed, FakeJudge.always(), on.model_copy(update={"stage2_skip": "off"}),
                              RunStore(tmp_path / "run"))
    assert ctx.early_stop and ctx.skip_inactive is False and ctx.generation_settings["stopped_by"] == "always"


def test_auto_compile_counts_the_runs_prompts_and_leaves_the_device_to_each_process(tmp_path, tiny_lm):
    from types import SimpleNamespace

    import torch

    from refusalscope.store import RunStore

    auto = RunSettings(out=tmp_path / "run")
    assert auto.compile_generation == "auto"
    assert steps.compile_setting(auto, auto.compile_min_prompts - 1) == "off"  # too few to pay the compile back
    assert steps.compile_setting(auto, auto.compile_min_prompts) == "auto"  # a Ray worker's own device decides
    assert steps.compile_setting(auto.model_copy(update={"compile_generation": "inductor"}), 1) == "inductor"
    on_ray = auto.model_copy(update={"ray": "local", "ray_workers": 4})  # each of 4 workers compiles for its share
    assert steps.compile_setting(on_ray, 4 * (auto.compile_min_prompts - 1)) == "off"
    assert steps.compile_setting(on_ray, 4 * (auto.compile_min_prompts - 1) + 1) == "auto"  # the busiest one
    assert steps.compile_setting(on_ray.model_copy(update={"ray_workers": None}), auto.compile_min_prompts) == "auto"
    ctx = steps.stage_context(tiny_lm, {}, FakeJudge.always(), auto, RunStore(tmp_path / "run"))
    assert ctx.compile == "off"  # this process is a CPU
    gpu = SimpleNamespace(**{**vars(tiny_lm), "device": torch.device("cuda")})  # what a GPU worker would build
    saes = {arch: {3: random_sae(arch, d=tiny_lm.d_model, m=16, layer=3)} for arch in ("jumprelu", "topk")}
    ctx = steps.stage_context(gpu, saes["jumprelu"], FakeJudge.always(), auto, RunStore(tmp_path / "run"))
    assert ctx.compile == "inductor"
    ctx = steps.stage_context(gpu, saes["topk"], FakeJudge.always(), auto, RunStore(tmp_path / "run"))
    assert ctx.compile == "off"  # TopK SAEs stay eager under auto


def test_compile_scoring_reaches_the_stage_scorers(tmp_path, tiny_lm):
    """--compile-scoring (off by default) is what every Stage-2 scorer of the run's context compiles with."""
    from refusalscope.store import RunStore

    saes = {3: random_sae("jumprelu", d=tiny_lm.d_model, m=16, layer=3)}
    base = RunSettings(out=tmp_path / "run")
    assert base.compile_scoring == "off"
    for setting in ("off", "aot_eager"):
        ctx = steps.stage_context(tiny_lm, saes, FakeJudge.always(),
                                  base.model_copy(update={"compile_scoring": setting}), RunStore(tmp_path / "run"))
        assert ctx.compile_scoring == setting
        assert ctx.scorer("Hi there", [(3, 1), (3, 2)]).compile == setting


def test_changed_sae_training_options_on_a_trained_run_are_refused_unless_rounding_only(tmp_path, tiny_dirs,
                                                                                        tiny_lm):
    from refusalscope.config import SaeTrainOptions
    from refusalscope.store import RunStore

    settings = RunSettings(model=str(tiny_dirs["qwen2"]), out=tmp_path / "run", device="cpu")
    store = RunStore(settings.out)
    store.write_json("saes.json", {"spec": "cache:saes/x", "layers": [1, 2], "kind": "trained",
                                   "config": SaeTrainOptions(width=64).model_dump(mode="json")})
    plain = settings.model_copy(update={"sae_train": SaeTrainOptions(width=64, share_prefix=False)})
    assert steps.ensure_saes(tiny_lm, plain, store) is None  # the recorded set stands; nothing is retrained
    wider = settings.model_copy(update={"sae_train": SaeTrainOptions(width=128)})
    with pytest.raises(RefusalScopeError, match="holds SAEs trained with width=64"):
        steps.ensure_saes(tiny_lm, wider, store)


def test_a_loaded_set_records_the_neuronpedia_ids_its_saelens_metadata_names(tmp_path, tiny_dirs, tiny_lm):
    from refusalscope.store import RunStore

    root = tmp_path / "saes"
    for layer in (1, 2):
        save_sae(random_sae("topk", d=tiny_lm.d_model, m=32, layer=layer), root / f"layer_{layer}",
                 extra_metadata={"neuronpedia_id": f"tiny/{layer}-res"})
    settings = RunSettings(model=str(tiny_dirs["qwen2"]), out=tmp_path / "run", saes=str(root), device="cpu")
    store = RunStore(settings.out)
    assert sorted(steps.ensure_saes(tiny_lm, settings, store)) == [1, 2]
    assert store.read_json("saes.json")["neuronpedia"] == {"1": "tiny/1-res", "2": "tiny/2-res"}


def test_stage3_reuses_the_stages_placed_saes_and_places_only_the_other_layers(tmp_path, tiny_lm, monkeypatch):
    """The FM's layers 2..l* overlap the stages' 3..l*: a layer the stages placed is not placed (copied) again."""
    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=16, layer=layer) for layer in (1, 2, 3)}
    settings = RunSettings(out=tmp_path / "run")
    placed = {layer: saes[layer].to("cpu") for layer in (2, 3)}
    asked = []
    real = steps.place_saes
    monkeypatch.setattr(steps, "place_saes", lambda s, *a: asked.append(sorted(s)) or real(s, *a))
    out = steps.layer_saes(saes, [1, 2, 3], placed, settings, tiny_lm)
    assert asked == [[1]] and sorted(out) == [1, 2, 3]
    assert out[2] is placed[2] and out[3] is placed[3] and torch.equal(out[1].W_dec, saes[1].W_dec)
