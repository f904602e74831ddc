"""Batched, left-padded forwards and greedy generation, optionally under interventions.

Prompts are sorted by length before batching (less padding) and results come back in the caller's order.
Only the last position's logits are computed where that is all that is needed (``logits_to_keep=1``).
``share_prefix`` runs the chat template's prefix once per batch (``lm.shared_prefix``) under uniform interventions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from refusalscope.interventions import Intervention, hooks_for
from refusalscope.lm.compiled import LENGTH_BUCKET, compile_errors, generate_kwargs, padded_rows, static_cache
from refusalscope.lm.hooks import Hook, batch_context, hooked
from refusalscope.lm.loading import LoadedModel, cache_argument
from refusalscope.lm.prompts import format_chat, template_prefix_length, tokenize
from refusalscope.lm.shared_prefix import prefix_forward, split_on_prefix, suffix_forward, suffix_last_logits


def length_sorted_batches(texts: Sequence[str], tokenizer, batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar token length, longest first (an OOM shows up on the first batch)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _progress(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, unit="prompt", disable=not show, leave=False, dynamic_ncols=True)


def _shared_prefix_len(lm: LoadedModel, share_prefix: bool, interventions: Sequence[Intervention],
                       extra_hooks: Sequence[Hook]) -> int:
    """Template prefix tokens a batch may run once (``lm.shared_prefix``); 0 (the plain forward) when not asked,
    or when an edit might treat rows or positions differently."""
    if not share_prefix or extra_hooks or not all(iv.uniform for iv in interventions):
        return 0
    return template_prefix_length(lm.tokenizer)


def map_last_logits(lm: LoadedModel, instructions: Sequence[str], fn: Callable[[torch.Tensor], torch.Tensor], *,
                    interventions: Sequence[Intervention] = (), batch_size: int = 16, extra_hooks: Sequence[Hook] = (),
                    desc: str = "forward", progress: bool = True, share_prefix: bool = False) -> torch.Tensor:
    """Apply ``fn`` to the float32 last-position logits (B, V) of each batch; results stacked in input order.

    ``share_prefix``: the chat template's prefix runs once per batch and each prompt's own tokens after its
    key/value cache (same logits up to float rounding); used only under uniform interventions and no extra hooks.
    """
    texts = format_chat(lm.tokenizer, instructions)
    prefix_len = _shared_prefix_len(lm, share_prefix, interventions, extra_hooks)
    results: list[torch.Tensor | None] = [None] * len(texts)
    with _progress(len(texts), desc, progress) as bar:
        for rows in length_sorted_batches(texts, lm.tokenizer, batch_size):
            hooks = [*hooks_for(interventions, lm.n_layers, rows), *extra_hooks]
            split = split_on_prefix(lm.tokenizer, [texts[i] for i in rows], prefix_len, lm.device)
            if split is not None:
                cache, _ = prefix_forward(lm, split, hooks)
                logits = suffix_last_logits(lm, split, cache, hooks)
            else:
                batch = tokenize(lm.tokenizer, [texts[i] for i in rows], lm.device)
                with torch.inference_mode(), hooked(lm.model, hooks), batch_context(batch["attention_mask"]):
                    logits = lm.model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
            out = fn(logits).cpu()
            for j, i in enumerate(rows):
                results[i] = out[j]
            bar.update(len(rows))
    return torch.stack(results) if results else torch.empty(0)  # type: ignore[arg-type]


def last_logprobs(lm: LoadedModel, instructions: Sequence[str], **kw) -> torch.Tensor:
    """Log-softmax of the next-token distribution after each prompt, (N, V)."""
    return map_last_logits(lm, instructions, lambda x: torch.log_softmax(x, dim=-1), **kw)


def collect_residuals(lm: LoadedModel, instructions: Sequence[str], positions: Sequence[int], *,
                      layers: Sequence[int] | None = None, batch_size: int = 16, interventions=(),
                      desc: str = "activations", progress: bool = True, share_prefix: bool = False) -> torch.Tensor:
    """resid_pre activations at ``positions`` (negative offsets), as float32 (N, n_layers, n_positions, d).

    ``share_prefix``: as in ``map_last_logits``; a batch runs plainly when a position falls inside the prefix.
    """
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    texts = format_chat(lm.tokenizer, instructions)
    out = torch.zeros(len(texts), len(layers), len(positions), lm.d_model, dtype=torch.float32)
    pos = list(positions)
    prefix_len = _shared_prefix_len(lm, share_prefix, interventions, ())
    with _progress(len(texts), desc, progress) as bar:
        for rows in length_sorted_batches(texts, lm.tokenizer, batch_size):
            edits = hooks_for(interventions, lm.n_layers, rows)
            store: dict[int, torch.Tensor] = {}
            split = split_on_prefix(lm.tokenizer, [texts[i] for i in rows], prefix_len, lm.device)
            at = split.from_end(pos) if split is not None else None
            if at is not None:  # each row's positions in its right-padded suffix
                take = lambda h: h[torch.arange(h.shape[0], device=h.device)[:, None], at]  # noqa: E731
            else:
                split, take = None, lambda h: h[:, pos, :]  # noqa: E731

            def recorder(layer: int):
                def edit(h: torch.Tensor):
                    store[layer] = take(h).float().cpu()
                return edit

            records = [Hook("resid_pre", layer, recorder(layer)) for layer in layers]
            if split is not None:
                cache, _ = prefix_forward(lm, split, edits)
                suffix_forward(lm, split, cache, [*edits, *records])
            else:
                batch = tokenize(lm.tokenizer, [texts[i] for i in rows], lm.device)
                with torch.inference_mode(), hooked(lm.model, [*edits, *records]), \
                        batch_context(batch["attention_mask"]):
                    lm.model(**batch, logits_to_keep=1, use_cache=False)
            idx = torch.tensor(rows)
            for k, layer in enumerate(layers):
                out[idx, k] = store[layer]
            bar.update(len(rows))
    return out


class _StopWhenDecided(StoppingCriteria):
    """A transformers stopping criterion: a row ends as soon as ``decide`` says so for its decoded new text."""

    def __init__(self, tokenizer, prompt_len: int, decide: Callable[[list[str]], Sequence[bool]]):
        self.tokenizer, self.prompt_len, self.decide = tokenizer, prompt_len, decide

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(x) for x in self.decide(texts)], dtype=torch.bool, device=input_ids.device)


def generate(lm: LoadedModel, instructions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             interventions: Sequence[Intervention] = (), desc: str = "generate", progress: bool = True,
             stop: Callable[[list[str], list[str]], Sequence[bool]] | None = None,
             compile: str = "off") -> list[str]:
    """Greedy completions (special tokens stripped), in input order.

    ``stop(instructions, texts) -> [bool]`` (e.g. ``Judge.decided``) is asked after every new token with each
    row's instruction and text so far; a row it marks ends there (its completion is that text), and a batch ends
    once every row has.

    ``compile`` (``lm.compiled.MODES``): decode with a static cache (``lm.compiled.static_cache``) and a compiled
    step; batches are padded to a power-of-two row count (at most ``batch_size``) and a multiple of
    ``LENGTH_BUCKET`` tokens so compiled shapes are reused (interventions should be shape-stable too:
    ``LatentAblation.padded``).
    """
    compiled = generate_kwargs(compile, lm.device)
    texts = format_chat(lm.tokenizer, instructions)
    completions: list[str] = [""] * len(texts)
    tok = lm.tokenizer
    eos = [t for t in {tok.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)} if t is not None]
    eos_ids = sorted({e for t in eos for e in (t if isinstance(t, list) else [t])})
    with _progress(len(texts), desc, progress) as bar:
        for rows in length_sorted_batches(texts, tok, batch_size):
            run = padded_rows(rows, batch_size) if compiled else rows
            batch = tokenize(tok, [texts[i] for i in run], lm.device, multiple_of=LENGTH_BUCKET if compiled else None)
            with (torch.inference_mode(), hooked(lm.model, hooks_for(interventions, lm.n_layers, run)),
                  batch_context(batch["attention_mask"])):
                extra = dict(compiled)
                if compiled:
                    extra[cache_argument(lm.model)] = static_cache(lm.model, len(run),
                                                                   batch["input_ids"].shape[1] + max_new_tokens)
                if stop is not None:
                    asked = [instructions[i] for i in run]
                    criterion = _StopWhenDecided(tok, batch["input_ids"].shape[1],
                                                 lambda done, asked=asked: stop(asked, done))
                    extra["stopping_criteria"] = StoppingCriteriaList([criterion])
                with compile_errors(compile):
                    out = lm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                            temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                                            eos_token_id=eos_ids, **extra)
            new = out[:, batch["input_ids"].shape[1]:]
            for j, i in enumerate(rows):
                completions[i] = tok.decode(new[j], skip_special_tokens=True)
            bar.update(len(rows))
    return completions
