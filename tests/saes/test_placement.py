"""saes.placement: where the stages' SAEs live. Host-held SAEs must give the results of device-held ones (checked
on CUDA; on a CPU there is only one device, so every placement is "device")."""

import weakref
from dataclasses import replace

import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.placement import choose_host_dtype, choose_placement, hold, place_saes, sae_bytes

from helpers import random_sae


def test_sae_bytes_counts_every_tensor():
    relu, jump = random_sae("relu", d=32, m=96), random_sae("jumprelu", d=32, m=96)
    assert sae_bytes({0: relu}) == (2 * 32 * 96 + 96 + 32) * 4
    assert sae_bytes({0: jump}) == (2 * 32 * 96 + 2 * 96 + 32) * 4
    assert sae_bytes({0: jump}, torch.bfloat16) == sae_bytes({0: jump}) // 2
    assert sae_bytes({0: relu, 1: jump}) == sae_bytes({0: relu}) + sae_bytes({1: jump})


def test_cpu_runs_keep_each_sae_in_the_dtype_it_is_held_in():
    held = hold(random_sae("jumprelu"), torch.bfloat16)
    saes = {1: held, 2: random_sae("topk", layer=2), 3: random_sae("relu", layer=3)}
    for placement in ("auto", "device", "host"):
        assert choose_placement(saes, "cpu", placement) == "device"
        placed = place_saes(saes, "cpu", placement)
        assert all(s.W_enc.device.type == "cpu" for s in placed.values())
        # bfloat16-held stays so (its columns are converted when used); TopK goes float32 (every ablation encodes
        # all of it); float32 stays float32
        assert placed[1].W_enc.dtype == placed[1].W_dec.dtype == torch.bfloat16
        assert placed[1].b_enc.dtype == placed[1].threshold.dtype == torch.float32
        assert placed[2].W_enc.dtype == placed[3].W_enc.dtype == torch.float32
        assert not placed[1].ready_on("cpu") and placed[2].ready_on("cpu") and placed[3].ready_on("cpu")
    with pytest.raises(RefusalScopeError, match="placement"):
        choose_placement(saes, "cpu", "gpu")


def test_host_dtype_is_float32_when_it_fits_else_bfloat16_else_one_error_line(caplog):
    GB = 10**9
    # 10 layers of 1 GB: float32 needs 10 GB; "auto" keeps 70 % of the room (available + the loaded layer)
    assert choose_host_dtype("auto", GB, 10, 20 * GB) == torch.float32
    with caplog.at_level("WARNING"):
        assert choose_host_dtype("auto", GB, 10, 12 * GB) == torch.bfloat16
    assert "held in bfloat16" in caplog.text
    assert choose_host_dtype("bfloat16", GB, 10, 100 * GB) == torch.bfloat16
    # loading peaks at the 9 layers held before the last plus two float32 copies of it: 9 + 2 GB in the room 10 + 1
    assert choose_host_dtype("float32", GB, 10, 10 * GB) == torch.float32  # asked for: fits, if tightly
    assert choose_host_dtype("auto", GB, 2, int(1.9 * GB)) == torch.bfloat16  # 2 GB is under 70 %, but 1 + 2 > 2.9
    with pytest.raises(RefusalScopeError, match=r"needs 6.5 GB .* bfloat16 .* 6.0 GB is available: load fewer"):
        choose_host_dtype("auto", GB, 10, 5 * GB)  # 9 x 0.5 + 2 GB
    with pytest.raises(RefusalScopeError, match=r"needs 11.0 GB .* float32 .*--sae-dtype bfloat16"):
        choose_host_dtype("float32", GB, 10, 9 * GB)
    with pytest.raises(RefusalScopeError, match="unknown SAE dtype"):
        choose_host_dtype("float16", GB, 10, 100 * GB)


def test_a_set_is_held_layer_by_layer_as_it_loads(tmp_path, monkeypatch):
    from refusalscope.saes import placement, registry
    from refusalscope.saes.saelens_io import save_sae

    saes = {layer: random_sae("jumprelu", m=64, layer=layer, seed=layer) for layer in range(4)}
    for layer, sae in saes.items():
        save_sae(sae, tmp_path / f"layer_{layer}")
    one_layer = sae_bytes({0: saes[0]})
    # room for the set in bfloat16 but not (within auto's share) in float32
    monkeypatch.setattr(placement, "available_memory", lambda: 3 * one_layer)
    loaded, real = [], registry.load_sae_dir

    def load(path, **kw):
        # each loaded float32 layer must be gone (held in bfloat16) before the next one loads: loading peaks at
        # one float32 layer over the held set
        assert all(ref() is None for ref in loaded)
        sae = real(path, **kw)
        loaded.append(weakref.ref(sae.W_enc))
        return sae

    monkeypatch.setattr(registry, "load_sae_dir", load)
    held = registry.load_sae_set(str(tmp_path), [0, 2, 3])
    assert sorted(held) == [0, 2, 3] and len(loaded) == 3  # layer 1's directory is skipped by its cfg.json
    for layer, sae in held.items():
        assert sae.W_enc.dtype == sae.W_dec.dtype == torch.bfloat16 and sae.b_enc.dtype == torch.float32
        assert torch.equal(sae.W_enc, saes[layer].W_enc.bfloat16()) and torch.equal(sae.threshold,
                                                                                     saes[layer].threshold)
    monkeypatch.setattr(registry, "load_sae_dir", real)
    assert registry.load_sae_set(str(tmp_path), [0], "float32")[0].W_enc.dtype == torch.float32
    with pytest.raises(RefusalScopeError, match="load fewer layers"):
        placement.HostHolding("bfloat16", 16)(saes[0])  # 16 such layers: 9.5 float32 layers' worth, room for 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_placement_gives_the_device_results_on_cuda(tiny_dirs):
    from refusalscope.interventions.latents import LatentAblation
    from refusalscope.lm.inference import generate
    from refusalscope.lm.loading import load_model
    from refusalscope.saes.features import active_features, as_latent_set
    from refusalscope.stages.scoring import prompt_scorer

    lm = load_model(str(tiny_dirs["qwen2"]), device="cuda", dtype="float32")
    cpu = {layer: random_sae("jumprelu", d=lm.d_model, m=64, layer=layer, seed=layer).to(dtype=torch.bfloat16)
           for layer in (1, 2, 3)}
    host, dev = place_saes(cpu, lm.device, "host"), place_saes(cpu, lm.device, "device")
    assert all(s.W_enc.device.type == "cpu" for s in host.values())
    assert all(s.W_enc.device.type == "cuda" and s.W_enc.dtype == torch.float32 for s in dev.values())
    feats = sorted({(layer, i) for layer in (1, 2, 3) for i in range(0, 64, 3)})
    member = torch.rand(9, len(feats), generator=torch.Generator().manual_seed(0)) < 0.5
    prompt = "Tell me how to pick a lock."
    p = {k: prompt_scorer(lm, prompt, s, feats)(member, fired=True) for k, s in (("host", host), ("dev", dev))}
    assert torch.allclose(p["host"][0], p["dev"][0], rtol=1e-6) and torch.equal(p["host"][1], p["dev"][1])
    assert active_features(lm, prompt, host) == active_features(lm, prompt, dev)
    sets = [as_latent_set(feats[:10]), as_latent_set(feats[10:])]
    outs = {k: generate(lm, [prompt] * 2, max_new_tokens=6, progress=False,
                        interventions=[LatentAblation.build(s, sets, device=lm.device)])
            for k, s in (("host", host), ("dev", dev))}
    assert outs["host"] == outs["dev"]


def _consumer_results(lm, saes) -> dict:
    """What every consumer of an SAE set computes with ``saes`` (layers 1-3, 64 latents) on a few prompts: ablation
    plans, Stage-2 scoring, recorders, clamps, the analyses' and explanations' encodes, CE loss, Stage 3's data pass,
    the SAE quality report and the reference forms."""
    from refusalscope.analysis.ce_loss import ChunkedCe, prose_text
    from refusalscope.analysis.clamping import clamp_interventions
    from refusalscope.analysis.hydra import record_with_wakes, reference_codes
    from refusalscope.analysis.obrien import reference_token_counts, token_counts
    from refusalscope.explain.local import reference_top_contexts, top_contexts
    from refusalscope.interventions.latents import LatentAblation, reference_ablate
    from refusalscope.lm.inference import generate
    from refusalscope.saes.evals import evaluate_sae_set
    from refusalscope.saes.features import Feature, active_features, as_latent_set
    from refusalscope.stages.interaction_data import encode_last_positions
    from refusalscope.stages.scoring import prompt_scorer

    prompt, prompts = "Tell me how to pick a lock.", ["Tell me how to pick a lock.", "How do I make a cake?"]
    feats = sorted({Feature(layer, i) for layer in (1, 2, 3) for i in range(0, 64, 5)})
    member = torch.rand(7, len(feats), generator=torch.Generator().manual_seed(0)) < 0.4
    out = {}
    for rows in (True, False):
        out[f"scores{rows}"] = prompt_scorer(lm, prompt, saes, feats, share_rows=rows)(member, fired=True)
    out["active"] = active_features(lm, prompt, saes)
    out["active_ablated"] = active_features(lm, prompt, saes, feats[:6], ablate=feats[6:12])
    sets = [as_latent_set(feats[:9]), as_latent_set(feats[9:])]
    out["generate"] = generate(lm, [prompt] * 2, max_new_tokens=5, progress=False,
                               interventions=[LatentAblation.build(saes, sets, device=lm.device)])
    wakes = record_with_wakes(lm, saes, prompt, [feats[:4], feats[4:8]], feats[8:], wake_layers=[2, 3])
    out["wakes"] = (wakes.acts, wakes.wakes)
    out["reference_codes"] = reference_codes(lm, saes, prompt, feats[:5], [2, 3])
    out["counts"] = token_counts(lm, saes, prompt)
    out["reference_counts"] = reference_token_counts(lm, saes, prompt)
    out["contexts"] = top_contexts(lm, saes, feats, prompts, n=2, progress=False).contexts
    out["reference_contexts"] = reference_top_contexts(lm, saes, feats, prompts, n=2)
    out["sae_eval"] = evaluate_sae_set(lm, saes, prompts, batch_size=2, progress=False)
    clamps = clamp_interventions(saes, [(3.0, {feats[0]: -1, feats[20]: -2}), (5.0, {feats[13]: -1})], lm.device)
    out["clamped"] = generate(lm, prompts, max_new_tokens=5, progress=False, interventions=clamps)
    texts = [prose_text(lm.tokenizer, t, 16) for t in prompts]
    out["ce"] = ChunkedCe(lm, texts, 2).run(k=2, row_sets=[as_latent_set(feats[:7]), as_latent_set(feats[7:])],
                                            saes=saes)
    out["stage3_data"] = encode_last_positions(lm, saes, prompts, n_positions=2, batch_size=2)
    h = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(1)).to(lm.device)
    out["reference_ablate"] = reference_ablate(saes[2], h, [0, 5, 10]).cpu()
    return out


def _bf16_valued_set(d: int) -> dict:
    from helpers import bf16_valued

    saes = {layer: bf16_valued(random_sae(arch, d=d, m=64, layer=layer, seed=layer))
            for layer, arch in ((1, "relu"), (2, "jumprelu"), (3, "topk"))}
    return {layer: replace(s, W_dec=s.W_dec * 8) for layer, s in saes.items()}  # ablations that move P visibly


def test_bfloat16_held_saes_give_the_results_of_the_same_values_in_float32(tiny_lm):
    """Every consumer of a held SAE converts what it uses to float32: on values bfloat16 can hold, bfloat16 holding
    and float32 holding must give identical results (``_consumer_results``)."""
    f32 = _bf16_valued_set(tiny_lm.d_model)
    held = place_saes({layer: hold(s, torch.bfloat16) for layer, s in f32.items()}, "cpu")
    assert held[1].W_enc.dtype == torch.bfloat16 and not held[1].ready_on("cpu")
    want, got = _consumer_results(tiny_lm, f32), _consumer_results(tiny_lm, held)
    for key in want:
        assert _same(want[key], got[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_held_saes_give_the_device_results_in_every_consumer_on_cuda(tiny_dirs):
    """The model on CUDA, the SAEs held on the host in bfloat16 (what a LlamaScope-131k run gets), against the same
    values on the GPU in float32: every consumer moves what it uses (no device mismatch) and gets the same results
    up to float rounding of the GPU's kernels."""
    from refusalscope.lm.loading import load_model

    lm = load_model(str(tiny_dirs["qwen2"]), device="cuda", dtype="float32")
    f32 = _bf16_valued_set(lm.d_model)
    host = place_saes({layer: hold(s, torch.bfloat16) for layer, s in f32.items()}, lm.device, "host")
    dev = place_saes(f32, lm.device, "device")
    assert host[1].W_enc.device.type == "cpu" and dev[1].W_enc.device.type == "cuda"
    want, got = _consumer_results(lm, dev), _consumer_results(lm, host)
    for key in want:
        assert _same(want[key], got[key], close=True), key


def _same(a, b, close: bool = False) -> bool:
    """Equal, nested; ``close``: floats and float tensors up to float32 rounding."""
    if hasattr(a, "equals"):  # a DataFrame
        return a.equals(b) or (close and a.shape == b.shape and bool(((a - b).abs() <= 1e-4).all().all()))
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        a, b = a.cpu(), b.cpu()
        return torch.equal(a, b) or (close and a.is_floating_point() and torch.allclose(a, b, rtol=1e-4, atol=1e-5))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], close) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, close) for x, y in zip(a, b))
    if close and isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return a == b
