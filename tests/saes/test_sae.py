"""SAEs: our encodes agree with SAELens, saving round-trips through SAELens, loading errors are clear."""

import json

import pytest
import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.saes.sae import check_against_model
from refusalscope.saes.saelens_io import from_saelens, layer_from_hook_name, load_sae_dir, save_sae, to_saelens
from refusalscope.saes.registry import load_sae_set
from refusalscope.saes.training.topk import TrainConfig, train_topk

from helpers import ARCH_LIST, random_sae


@pytest.mark.parametrize("arch", ARCH_LIST)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_encode_matches_saelens(arch, apply_b_dec):
    sae = random_sae(arch, apply_b_dec=apply_b_dec)
    x = torch.randn(5, 7, 32)
    ref = to_saelens(sae)
    assert torch.allclose(sae.encode(x), ref.encode(x), atol=1e-6)
    assert torch.allclose(sae.decode(sae.encode(x)), ref.decode(ref.encode(x)), atol=1e-6)


@pytest.mark.parametrize("arch", ARCH_LIST)
@pytest.mark.parametrize("n", [3, 40])  # TopK: few latents matched against the winners, many read from the code
def test_encode_subset_is_the_full_encode_at_those_latents(arch, n):
    from dataclasses import replace

    sae = replace(random_sae(arch, d=32, m=96), max_norm=6.8)  # some tokens outside the domain
    x = torch.randn(4, 9, 32) * 1.2
    latents = torch.randperm(96, generator=torch.Generator().manual_seed(n))[:n]
    full = sae.encode(x).index_select(-1, latents)
    sub = sae.encode_subset(x, latents)
    assert (full > 0).any()
    if sae.independent:  # a narrower matrix product: equal up to its rounding
        assert torch.allclose(sub, full, atol=1e-6)
    else:  # the same full encode, read at the latents, overflowing tokens included (inf stays inf, never NaN)
        assert torch.equal(sub, full)
        x[0, 0] = 3e38
        wide = replace(sae, max_norm=None)
        assert torch.equal(wide.encode_subset(x, latents), wide.encode(x).index_select(-1, latents))


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_save_load_roundtrip_through_saelens(arch, tmp_path):
    from sae_lens import SAE

    sae = random_sae(arch, layer=3, apply_b_dec=True)
    save_sae(sae, tmp_path / "s", model_name="tiny")
    raw = SAE.load_from_disk(str(tmp_path / "s"))
    x = torch.randn(4, 32)
    assert torch.equal(raw.encode(x), sae.encode(x))
    back = load_sae_dir(tmp_path / "s")
    assert back.layer == 3 and back.arch == arch
    assert torch.equal(back.encode(x), sae.encode(x))


def test_max_norm_is_saved_and_zeroes_out_of_domain_tokens(tmp_path):
    sae = random_sae("relu", max_norm=20.0)
    save_sae(sae, tmp_path / "s")
    back = load_sae_dir(tmp_path / "s")
    assert back.max_norm == 20.0
    x = torch.randn(3, 32)
    x[1] *= 100  # far above the norm limit
    z = back.encode(x)
    assert z[1].abs().sum() == 0 and z[0].abs().sum() > 0
    assert torch.equal(back.encode_subset(x, torch.arange(10))[1], torch.zeros(10))


def test_topk_with_decoder_norm_rescaling_is_folded():
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=16, d_sae=48, k=4, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    raw = TopKSAE(cfg)
    with torch.no_grad():
        for p in raw.parameters():
            p.normal_()
    raw.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    ours = from_saelens(raw)
    x = torch.randn(6, 16)
    assert torch.allclose(ours.decode(ours.encode(x)), raw.decode(raw.encode(x)), atol=1e-4)
    assert torch.equal(ours.encode(x) > 0, raw.encode(x) > 0)


def test_hook_names():
    assert layer_from_hook_name("blocks.12.hook_resid_post") == 12
    assert layer_from_hook_name("blocks.13.hook_resid_pre") == 12
    assert layer_from_hook_name("blocks.3.hook_mlp_out") is None


def test_wrong_hook_point_or_layer_is_refused():
    raw = to_saelens(random_sae("relu", layer=4))
    with pytest.raises(RefusalScopeError, match="layer 4"):
        from_saelens(raw, layer=5)
    raw.cfg.metadata.hook_name = "blocks.5.hook_resid_pre"  # block 5's input is layer 4's output
    with pytest.raises(RefusalScopeError, match="ask for layer 4 with the id of block 5"):
        from_saelens(raw, layer=5)
    raw.cfg.metadata.hook_name = "blocks.4.hook_mlp_out"
    with pytest.raises(RefusalScopeError, match="not the residual stream"):
        from_saelens(raw)


def test_the_neuronpedia_id_saelens_carries_is_kept_and_recorded_for_the_run():
    from refusalscope.saes.run_set import neuronpedia_record

    raw = to_saelens(random_sae("jumprelu", layer=3), extra_metadata={"neuronpedia_id": "m/3-src"})
    assert from_saelens(raw).neuronpedia_id == "m/3-src"
    assert from_saelens(raw, neuronpedia_id="given/3-x").neuronpedia_id == "given/3-x"  # the registry's wins
    plain = from_saelens(to_saelens(random_sae("jumprelu", layer=4)))
    assert plain.neuronpedia_id is None
    assert neuronpedia_record({3: from_saelens(raw)}) == {"neuronpedia": {"3": "m/3-src"}}
    assert neuronpedia_record({3: from_saelens(raw), 4: plain}) == {}  # only a set that names every layer's


def test_size_mismatch_and_layer_range_are_clear():
    saes = {2: random_sae("relu", d=32, layer=2)}
    with pytest.raises(RefusalScopeError, match="hidden size is 64"):
        check_against_model(saes, n_layers=4, d_model=64)
    with pytest.raises(RefusalScopeError, match="out of range"):
        check_against_model({7: random_sae("relu", layer=7)}, n_layers=4, d_model=32)


def test_latent_index_out_of_range():
    with pytest.raises(RefusalScopeError, match="out of range"):
        random_sae("relu", m=96).check_latents([3, 96])


def test_corrupt_sae_file_is_a_clear_error(tmp_path):
    save_sae(random_sae("jumprelu"), tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RefusalScopeError, match="corrupt"):
        load_sae_dir(tmp_path / "s")
    with pytest.raises(RefusalScopeError, match="not a SAELens SAE directory"):
        load_sae_dir(tmp_path / "nothing")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(RefusalScopeError):
        load_sae_dir(tmp_path / "t")


def test_sae_set_directory(tmp_path):
    for layer in (1, 2, 3):
        save_sae(random_sae("topk", layer=layer, seed=layer), tmp_path / f"layer_{layer}")
    saes = load_sae_set(str(tmp_path), [1, 3])
    assert sorted(saes) == [1, 3]
    with pytest.raises(RefusalScopeError, match="no SAE for layer"):
        load_sae_set(str(tmp_path), [5])
    with pytest.raises(RefusalScopeError, match="unknown SAE set"):
        load_sae_set(str(tmp_path / "missing"))


def test_registry_sets_name_paper_saes():
    from refusalscope.saes.registry import SAE_SETS

    g = SAE_SETS["gemmascope-res-65k"]
    assert g.sae_id(16) == "layer_16/width_65k/canonical" and g.release == "gemma-scope-2b-pt-res-canonical"
    assert SAE_SETS["llamascope-res-32k"].sae_id(13) == "l13r_8x"
    assert g.neuronpedia_id(16) == "gemma-2-2b/16-gemmascope-res-65k"


def test_topk_trainer_learns_sparse_data():
    """Data that is exactly 4-sparse in a random dictionary: a TopK SAE recovers most of the variance."""
    g = torch.Generator().manual_seed(0)
    d, m, n = 32, 64, 8192
    dictionary = torch.randn(m, d, generator=g)
    idx = torch.stack([torch.randperm(m, generator=g)[:4] for _ in range(n)])
    codes = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, 4, generator=g) * 3 + 1)
    x = codes @ dictionary + 5.0  # an offset the decoder bias must learn
    sae, log = train_topk(x, 2, TrainConfig(width=128, k=8, epochs=12, batch_size=256, lr=3e-3, seed=0))
    recon = sae.decode(sae.encode(x))
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.2, fvu
    assert (sae.encode(x) > 0).sum(-1).float().mean() <= 8


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_an_sae_held_in_bfloat16_computes_in_float32(arch):
    """SAE arithmetic is float32 whatever the weights are held in (a set held in bfloat16 to fit the host): on
    values bfloat16 can hold, every encode and decode equals float32 holding's, bit for bit."""
    from refusalscope.saes.placement import hold

    from helpers import bf16_valued

    f32 = bf16_valued(random_sae(arch, apply_b_dec=True))
    held = hold(f32, torch.bfloat16)
    assert held.W_enc.dtype == held.W_dec.dtype == torch.bfloat16 and not held.ready_on("cpu")
    assert held.on("cpu").ready_on("cpu") and f32.on("cpu") is f32
    h = torch.randn(3, 5, f32.d_in, generator=torch.Generator().manual_seed(0)) * 2
    ids = torch.tensor([0, 7, 40, 95])
    z = f32.encode(h)
    assert z.count_nonzero() > 0
    assert torch.equal(held.encode(h), z) and held.encode(h).dtype == torch.float32
    assert torch.equal(held.encode_subset(h, ids), f32.encode_subset(h, ids))
    assert torch.equal(held.decode(z), f32.decode(z))


def test_moved_crosses_devices_in_the_narrower_dtype():
    """``moved`` is ``Tensor.to(device, dtype)`` with the same values, but the ``to`` that changes the device
    carries the narrower dtype: a widening move crosses first (a host-held bfloat16 weight goes to the GPU in half
    the bytes), a narrowing one converts first. The "meta" device stands in for the GPU."""
    from torch.overrides import TorchFunctionMode

    from refusalscope.saes.sae import moved

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.to:
                self.calls.append((args[0].dtype, args[0].device.type, out.dtype, out.device.type))
            return out

    t = torch.randn(4, 3).to(torch.bfloat16)
    with Seen() as seen:
        out = moved(t, "meta", torch.float32)
    assert (out.dtype, out.device.type) == (torch.float32, "meta")
    first_cross = next(c for c in seen.calls if c[1] != c[3])
    assert first_cross[0] == first_cross[2] == torch.bfloat16  # moved as bfloat16, widened after
    with Seen() as seen:  # narrowing: converted where it is, then moved
        out = moved(t.float(), "meta", torch.bfloat16)
    assert (out.dtype, out.device.type) == (torch.bfloat16, "meta")
    crossings = [c for c in seen.calls if c[1] != c[3]]
    assert len(crossings) == 1 and crossings[0][0] == crossings[0][2] == torch.bfloat16
    for src, dtype in [(t, torch.float32), (t.float(), torch.bfloat16), (t.float(), torch.float32), (t, None)]:
        for device in ["cpu", None]:  # same values as Tensor.to on one device
            assert torch.equal(moved(src, device, dtype), src.to(device=device, dtype=dtype))
    assert moved(None, "cpu", torch.float32) is None
    if torch.cuda.is_available():
        assert torch.equal(moved(t, "cuda", torch.float32).cpu(), t.float())
