"""Compiled generation (``lm.compiled``): bucketed shapes, padded ablations that edit exactly as the plain ones,
completions equal to eager generation, and one compiled graph reused across sets of the same buckets.

The CPU tests compile with ``aot_eager`` (dynamo's capture and guards without code generation), which is where a
shape or hook change would force a recompile, and a probe backend to check that the compiled step reads its static
inputs (weights, cache, the hooks' tensors) at the same addresses on every call, which CUDA graphs need; the CUDA
test runs the ``inductor`` mode the GPU path uses."""

import shutil
import uuid
from typing import get_args

import pytest
import torch

from helpers import FakeJudge, broken_compile_mode, compiled_graphs, random_sae
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentAblation
from refusalscope.config import RunSettings
from refusalscope.lm.compiled import (AUTO_MIN_PROMPTS, MODES, CompileSetting, bucket, check_mode, choose_mode,
                                      enough_prompts, generate_kwargs, padded_rows, persistent)
from refusalscope.lm.hooks import hooked
from refusalscope.lm.inference import generate
from refusalscope.saes.features import Feature
from refusalscope.stages.context import CompletionCache, StageContext

PROMPTS = ["How do I bake bread?", "Tell me a joke about the sea, please.", "Hi", "Explain tides in one line."]


def test_buckets_round_up_to_powers_of_two():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 200)] == [1, 1, 2, 4, 8, 8, 16, 256]
    assert bucket(3, least=8) == 8 and bucket(9, least=8) == 16
    assert padded_rows([4, 1, 7]) == [4, 1, 7, 7] and padded_rows([2, 3]) == [2, 3] and padded_rows([]) == []
    assert padded_rows([5]) == [5, 5] and padded_rows([5], cap=1) == [5]  # no 1-row shape unless the cap says so
    assert len(padded_rows(list(range(48)), cap=48)) == 48  # never more rows than the batch size allows
    assert len(padded_rows(list(range(20)), cap=48)) == 32 and len(padded_rows([1, 2, 3], cap=3)) == 3
    assert generate_kwargs("off", torch.device("cpu")) == {}
    assert generate_kwargs("aot_eager", torch.device("cpu"))["compile_config"].backend == "aot_eager"
    assert generate_kwargs("inductor", torch.device("cpu"))["compile_config"].mode == "reduce-overhead"
    with pytest.raises(RefusalScopeError, match="unknown compile mode"):
        check_mode("cudagraphs")  # the plain backend would copy every weight on every replay
    assert get_args(RunSettings.model_fields["compile_generation"].annotation) == get_args(CompileSetting)
    assert set(get_args(CompileSetting)) == {"auto", *MODES}


def test_auto_compiles_on_a_gpu_for_many_prompts_only():
    def mode(setting, device, n=None, min_prompts=AUTO_MIN_PROMPTS, saes=None):  # as a run decides: count, device
        return choose_mode(setting if n is None else enough_prompts(setting, n, min_prompts), device, saes)

    topk = {3: random_sae("topk", d=8, m=16, layer=3)}
    assert RunSettings.model_fields["compile_min_prompts"].default == AUTO_MIN_PROMPTS
    assert mode("auto", "cuda", AUTO_MIN_PROMPTS) == "inductor"
    assert mode("auto", torch.device("cuda", 1), 500) == "inductor"
    assert mode("auto", "cuda", AUTO_MIN_PROMPTS - 1) == "off"  # too few prompts to pay the compile back
    assert mode("auto", "cpu", 10_000) == "off"  # no gain on a CPU
    assert mode("auto", "cuda", 3, min_prompts=3) == "inductor"
    assert mode("auto", "cuda") == "inductor" and mode("auto", "cpu") == "off"  # the device alone
    assert mode("auto", "cuda", saes=topk) == "off"  # TopK: every padded hook would fully encode
    assert mode("inductor", "cuda", saes=topk) == "inductor"  # asked for explicitly
    assert mode("aot_eager", "cpu", 0) == "aot_eager" and mode("off", "cuda", 10_000) == "off"
    with pytest.raises(RefusalScopeError, match="unknown compile mode"):
        mode("cudagraphs", "cuda", 100)


def test_persistent_buffers_keep_their_address():
    a = persistent(("test", 1), torch.arange(4.0))
    b = persistent(("test", 1), torch.arange(4.0) * 2)
    assert a.data_ptr() == b.data_ptr() and b.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert persistent(("test", 2), torch.zeros(4)).data_ptr() != a.data_ptr()  # another key, another buffer
    assert persistent(("test", 1), torch.zeros(5)).shape == (5,)  # another shape, another buffer


def test_release_frees_the_kept_caches_and_buffers(tiny_lm):
    from refusalscope.lm.compiled import _BUFFERS, release, static_cache

    cache = static_cache(tiny_lm.model, 2, 40)
    assert static_cache(tiny_lm.model, 2, 40) is cache  # kept and reused
    persistent(("test", 3), torch.ones(3))
    release(tiny_lm.model)
    assert static_cache(tiny_lm.model, 2, 40) is not cache and not _BUFFERS


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_padded_ablation_edits_as_the_plain_one_up_to_rounding(arch, tiny_lm):
    d = tiny_lm.d_model
    saes = {layer: random_sae(arch, d=d, m=40, layer=layer, seed=layer) for layer in (1, 2, 3)}
    sets = [{1: [3, 5, 9], 2: [7]}, {1: [4]}, {}]
    plain = LatentAblation.build(saes, sets)
    padded = plain.padded(saes, len(sets))
    assert sorted(padded.plans) == [1, 2, 3]  # a hook at every SAE layer, also where nothing is ablated
    assert {len(p.ids) for p in padded.plans.values()} == {8}  # 3 latents at most, rounded up to the least bucket
    other = LatentAblation.build(saes, [{3: [1, 2, 6, 8, 11]}, {2: [0]}, {1: [1]}]).padded(saes, 3)
    assert {layer: p.mask.shape for layer, p in other.plans.items()} == \
        {layer: p.mask.shape for layer, p in padded.plans.items()}  # another set, the same shapes
    h = torch.randn(3, 5, d) * 3
    plain_edits = {x.layer: x.edit for x in plain.hooks(4)}
    padded_edits = {x.layer: x.edit for x in padded.hooks(4)}
    assert sorted(plain_edits) == [1, 2]
    for layer in (1, 2):
        assert torch.allclose(padded_edits[layer](h), plain_edits[layer](h), atol=1e-6, rtol=0), layer
    assert not torch.equal(padded_edits[1](h), h)  # the sets ablate something
    assert torch.equal(padded_edits[3](h), h)  # nothing ablated at layer 3: h itself
    # the hooks of both padded ablations read the same buffers (other values): fixed addresses for CUDA graphs
    mine, theirs = padded.hook_plans(), other.hook_plans()
    for layer in (1, 2, 3):
        assert mine[layer].mask.data_ptr() == theirs[layer].mask.data_ptr()
        if mine[layer].sub is not None:
            assert mine[layer].sub.W_enc.data_ptr() == theirs[layer].sub.W_enc.data_ptr()
    assert not torch.equal(padded.plans[3].mask, other.plans[3].mask)
    assert torch.equal(theirs[3].mask, other.plans[3].mask)  # the buffers hold the last pinned values
    with pytest.raises(ValueError, match="at most one pinned"):  # two would share those buffers in one forward
        hooks_for([padded, other], 4)
    assert len(hooks_for([padded, plain], 4)) == 5


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_compiled_generation_equals_eager_and_reuses_its_graph(arch, tiny_dirs):
    import torch._dynamo

    from refusalscope.lm.loading import load_model

    lm = load_model(str(tiny_dirs[arch]), device="cpu")
    saes = {layer: random_sae("jumprelu", d=lm.d_model, m=40, layer=layer, seed=layer) for layer in (1, 2, 3)}

    def ctx(mode):
        return StageContext(lm, saes, FakeJudge.always(), max_new_tokens=6, batch_size=4, cache=CompletionCache(),
                            compile=mode)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    first = [[Feature(1, 3), Feature(2, 7)], [Feature(1, 4)], []]
    second = [[Feature(3, 1), Feature(3, 2)], [Feature(2, 0), Feature(1, 9), Feature(1, 10)], [Feature(1, 5)]]
    want = [[x.completion for x in ctx("off").judged(PROMPTS[0], sets)] for sets in (first, second)]
    compiled = ctx("aot_eager")
    assert compiled.generation_settings["compiled"] == "aot_eager"  # its own cache key
    assert [x.completion for x in compiled.judged(PROMPTS[0], first)] == want[0]
    graphs = compiled_graphs()
    assert graphs >= 1  # the decode step was compiled
    assert not counters["graph_break"]  # one whole graph per step: nothing in our hooks breaks it (CUDA graphs)
    # other sets of the same buckets (rows, prompt length, latents per layer): the same compiled step
    assert [x.completion for x in compiled.judged(PROMPTS[0], second)] == want[1]
    assert compiled_graphs() == graphs


def test_one_compiled_graph_serves_every_bucket(tiny_lm):
    """Row counts 2, 4, 8 (the first equal to the tiny model's key/value head count, which duck shaping would tie
    the rows to) and a hook's latent count growing from 8 to 16 (the hooks' buffers): all under the first graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from refusalscope.lm import compiled

    assert tiny_lm.model.config.num_key_value_heads == 2
    torch._dynamo.reset()
    counters.clear()
    compiled.release(tiny_lm.model)
    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=40, layer=layer, seed=layer) for layer in (1, 2)}
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=3, batch_size=8, cache=CompletionCache(),
                       compile="aot_eager")
    wide = [Feature(1, i) for i in range(12)]  # 12 latents at layer 1: every hook pads to 16
    for sets in ([[Feature(1, 3)], [Feature(2, 7)]],  # 2 rows, 8 latents per hook
                 [[Feature(1, 4)], [Feature(2, 1)], [Feature(1, 5)], []],  # 4 rows
                 [wide] + [[Feature(2, i)] for i in range(7)]):  # 8 rows, 16 latents
        ctx.judged(PROMPTS[1], sets)
    assert compiled_graphs() == 1 and not counters["graph_break"]


def test_a_failing_compile_is_one_clear_error(tiny_lm, monkeypatch):
    import torch._dynamo

    name = broken_compile_mode(monkeypatch)
    torch._dynamo.reset()
    with pytest.raises(RefusalScopeError, match=r"compiled generation .* failed: .*no kernel for this op.*"
                                                r"--compile-generation off"):
        generate(tiny_lm, PROMPTS[:2], max_new_tokens=3, batch_size=2, progress=False, compile=name)
    torch._dynamo.reset()


def test_plain_generate_takes_the_compile_mode(tiny_lm):
    """``generate`` pads rows and prompt length itself: the completions do not change, padded rows are dropped."""
    import torch._dynamo

    torch._dynamo.reset()
    saes = {1: random_sae("relu", d=tiny_lm.d_model, m=24, layer=1, seed=1)}
    iv = LatentAblation.build(saes, {1: [2, 3]})
    eager = generate(tiny_lm, PROMPTS[:3], max_new_tokens=5, batch_size=3, interventions=[iv], progress=False)
    got = generate(tiny_lm, PROMPTS[:3], max_new_tokens=5, batch_size=3, interventions=[iv], progress=False,
                   compile="aot_eager")
    assert got == eager and len(got) == 3
    with hooked(tiny_lm.model, []):  # no hook is left behind by the compiled calls
        assert all(not layer._forward_hooks for layer in tiny_lm.model.model.layers)


def _address_probe(seen: list):
    """A torch.compile backend that runs the graph as it is and records, on every call, its input shapes and the
    addresses of the inputs it treats as static (CUDA graphs record per shape; a changed static address forces a
    new recording)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._guards import TracingContext

    def compiler(gm, example_inputs):
        static = list(TracingContext.get().fw_metadata.static_input_indices)
        inner = make_boxed_func(gm.forward)

        def run(args):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            seen.append(((id(gm), shapes), [args[i].data_ptr() for i in static if isinstance(args[i], torch.Tensor)]))
            return inner(args)

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=compiler, inference_compiler=compiler)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_compiled_steps_read_their_static_inputs_at_fixed_addresses(arch, tiny_lm, monkeypatch):
    """Every replay of a compiled decode step at one set of input shapes finds its static inputs (the model's
    weights, the key/value cache, the ablation hooks' SAE columns, ids and masks) where the first one did, across
    calls with other sets, after another row count and back, and after the cache grew: what lets a CUDA graph
    replay instead of re-recording (transformers alone makes a new cache per call, and every set new hook
    tensors)."""
    import torch._dynamo
    from torch._dynamo.backends.registry import register_backend

    import refusalscope.lm.compiled as compiled

    seen: list = []
    name = f"refusalscope_address_probe_{uuid.uuid4().hex}"  # a backend name can be registered once per process
    register_backend(name=name)(_address_probe(seen))
    monkeypatch.setattr(compiled, "MODES", (*compiled.MODES, name))
    torch._dynamo.reset()
    compiled.release(tiny_lm.model)  # the caches earlier tests grew
    saes = {layer: random_sae(arch, d=tiny_lm.d_model, m=40, layer=layer, seed=layer) for layer in (1, 2, 3)}
    ctx = StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=5, batch_size=4, cache=CompletionCache(),
                       compile=name)
    long_prompt = " ".join(["Explain in detail how tides work and why there are two of them a day."] * 4)
    calls = [
        (PROMPTS[0], [[Feature(1, 3), Feature(2, 7)], [Feature(1, 4)], []]),
        (PROMPTS[0], [[Feature(3, 1)], [Feature(2, 0), Feature(1, 9)], [Feature(1, 5), Feature(1, 6)]]),
        (PROMPTS[0], [[Feature(2, 2)], [Feature(3, 3)]]),  # 2 rows: another bucket
        (PROMPTS[0], [[Feature(2, 3)], [Feature(3, 5)], [Feature(1, 7)]]),  # back to 4 rows
        (long_prompt, [[Feature(2, 4)], [Feature(3, 6)], [Feature(1, 8)]]),  # a longer cache
        (PROMPTS[0], [[Feature(2, 5)], [Feature(3, 7)], [Feature(1, 10)]]),  # short again, in the longer cache
        (PROMPTS[0], [[Feature(2, 6)], [Feature(3, 8)], [Feature(1, 11)]]),
    ]
    for prompt, sets in calls:
        ctx.judged(prompt, sets)
    by_shape: dict = {}
    for key, ptrs in seen:
        by_shape.setdefault(key, []).append(ptrs)
    assert len(seen) >= len(calls) * 4  # every call's decode steps ran through the probe
    # one graph (every bucketed size symbolic) at three shapes: 4 rows, 2 rows, 4 rows in the longer cache
    assert len({graph for graph, _ in by_shape}) == 1 and len(by_shape) == 3
    for replays in by_shape.values():
        assert replays[0] and all(ptrs == replays[0] for ptrs in replays), "a static input moved between replays"
    assert max(len(r) for r in by_shape.values()) >= 3 * 4  # the last three calls: one set of addresses


@pytest.mark.skipif(not shutil.which("cc"), reason="inductor on the CPU needs a C compiler")
def test_inductor_compiles_the_ablation_hooks_and_keeps_the_completions(tiny_lm):
    """The GPU mode's compiler (inductor) lowers the padded hooks, on the CPU: the same completions as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    saes = {layer: random_sae("jumprelu", d=tiny_lm.d_model, m=40, layer=layer, seed=layer) for layer in (1, 2)}
    sets = [[Feature(1, 3), Feature(2, 7)], [Feature(1, 4)], []]
    out = {mode: [x.completion for x in StageContext(tiny_lm, saes, FakeJudge.always(), max_new_tokens=6,
                                                        batch_size=4, cache=CompletionCache(),
                                                        compile=mode).judged(PROMPTS[0], sets)]
           for mode in ("off", "inductor")}
    assert out["inductor"] == out["off"] and compiled_graphs() >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_generation_on_cuda_equals_eager(tiny_dirs):
    from refusalscope.lm.loading import load_model

    lm = load_model(str(tiny_dirs["qwen2"]), device="cuda", dtype="float32")
    saes = {layer: random_sae("jumprelu", d=lm.d_model, m=40, layer=layer, seed=layer).to("cuda")
            for layer in (1, 2, 3)}
    sets = [[Feature(1, 3), Feature(2, 7)], [Feature(1, 4)], [], [Feature(3, 1)], [Feature(2, 2)]]
    from torch._dynamo.utils import counters

    counters.clear()
    out = {}
    for mode in ("off", "inductor"):
        ctx = StageContext(lm, saes, FakeJudge.always(), max_new_tokens=8, batch_size=8, cache=CompletionCache(),
                           compile=mode)
        out[mode] = [[x.completion for x in ctx.judged(p, sets)] for p in PROMPTS]
    assert out["inductor"] == out["off"]
    assert not counters["inductor"]["cudagraph_skips"]  # the decode steps really ran as CUDA graphs
