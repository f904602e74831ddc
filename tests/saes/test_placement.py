"""saes.placement: where the stages' SAEs live. Host-held SAEs must give the results of device-held ones (checked
on CUDA; on a CPU there is only one device, so every placement is "device")."""

import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.placement import choose_placement, place_saes, sae_bytes

from helpers import random_sae


def test_sae_bytes_counts_every_tensor():
    relu, jump = random_sae("relu", d=32, m=96), random_sae("jumprelu", d=32, m=96)
    assert sae_bytes({0: relu}) == (2 * 32 * 96 + 96 + 32) * 4
    assert sae_bytes({0: jump}) == (2 * 32 * 96 + 2 * 96 + 32) * 4
    assert sae_bytes({0: jump}, torch.bfloat16) == sae_bytes({0: jump}) // 2
    assert sae_bytes({0: relu, 1: jump}) == sae_bytes({0: relu}) + sae_bytes({1: jump})


def test_cpu_runs_keep_every_sae_on_the_device_in_float32():
    saes = {1: random_sae("jumprelu").to(dtype=torch.bfloat16), 2: random_sae("topk", layer=2)}
    for placement in ("auto", "device", "host"):
        assert choose_placement(saes, "cpu", placement) == "device"
        placed = place_saes(saes, "cpu", placement)
        assert all(s.W_enc.dtype == torch.float32 and s.W_enc.device.type == "cpu" for s in placed.values())
    with pytest.raises(RefusalScopeError, match="placement"):
        choose_placement(saes, "cpu", "gpu")


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
