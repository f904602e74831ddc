"""Top-activating contexts of SAE features from one batched pass over a corpus, for SAEs without published
explanations (the default model's).

For each feature and each corpus text, the text's max activation over its tokens; a feature keeps the ``n`` texts
where that max is largest (and positive), each as a window of tokens around the max-activating token with the
feature's activation on every token of the window. In chat format the template's shared prefix (system prompt,
user header), identical in every text, is neither searched nor shown. One forward per batch serves every feature
of every layer: a hook on each SAE layer's resid_post encodes only the latents asked for there (the needed columns
of W_enc; TopK SAEs need the full encode), keeps a running top-n per latent, and the forward stops after the last
such layer.
``reference_top_contexts`` is the plain form (one text at a time, full encodes) the tests compare against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refusalscope.errors import RefusalScopeError
from refusalscope.explain.records import TopContext
from refusalscope.interventions.latents import encoder_on, restrict
from refusalscope.lm.hooks import Hook, StopForward, batch_context, hooked
from refusalscope.lm.inference import length_sorted_batches
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature, as_latent_set
from refusalscope.saes.sae import Sae


@dataclass
class ContextPass:
    """What the pass found, and what it cost."""

    contexts: dict[Feature, list[TopContext]]
    n_texts: int
    n_tokens: int  # real (unpadded) tokens encoded
    seconds: float


def corpus_texts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    """The texts the model reads: each prompt as a chat turn (as the stages see prompts), or as raw text."""
    return format_chat(tokenizer, prompts) if chat else list(prompts)


def shared_prefix_length(tokenizer, chat: bool) -> int:
    """Tokens of the chat template before the user's text (system prompt, user header). Causal attention makes
    them identical in every text, so a feature that fires there would show the same window for every prompt;
    contexts are searched and cut after them (our choice). 0 for raw text."""
    if not chat:
        return 0
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in format_chat(tokenizer, ["x", "Q 7"]))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encoder(sae: Sae, ids: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (..., d) on ``device`` -> activations of latents ``ids`` (..., len(ids)); independent latents use only
    their columns, copied to ``device`` (from a host-held SAE too)."""
    if not sae.independent:
        full, ids = encoder_on(sae, device), ids.to(device)
        return lambda h: full.encode(h).index_select(-1, ids)
    return restrict(sae, ids, device).encode


class _TopN:
    """Running top-``n`` texts of each of ``m`` latents: value, text index, position, window values and token ids."""

    def __init__(self, m: int, n: int, width: int):
        self.n, self.width = n, width
        self.vals = torch.full((m, 0), float("-inf"))
        self.rows = torch.zeros((m, 0), dtype=torch.long)
        self.pos = torch.zeros((m, 0), dtype=torch.long)
        self.win = torch.zeros((m, 0, width))
        self.tok = torch.zeros((m, 0, width), dtype=torch.long)

    def merge(self, vals, rows, pos, win, tok) -> None:
        """Add one batch's candidates (m, B[, width]) and keep the best ``n`` per latent."""
        vals = torch.cat([self.vals, vals], 1)
        k = min(self.n, vals.shape[1])
        top = vals.topk(k, dim=1).indices
        self.vals = vals.gather(1, top)
        self.rows = torch.cat([self.rows, rows], 1).gather(1, top)
        self.pos = torch.cat([self.pos, pos], 1).gather(1, top)
        idx3 = top[..., None].expand(-1, -1, self.width)
        self.win = torch.cat([self.win, win], 1).gather(1, idx3)
        self.tok = torch.cat([self.tok, tok], 1).gather(1, idx3)


def top_contexts(lm: LoadedModel, saes: Mapping[int, Sae], features: Sequence[Feature], prompts: Sequence[str], *,
                 n: int = 5, before: int = 10, after: int = 3, batch_size: int = 16, chat: bool = True,
                 progress: bool = True) -> ContextPass:
    """The top-``n`` contexts of every feature over ``prompts``, in one batched pass (see the module docstring)."""
    start = time.perf_counter()
    by_layer = {layer: sorted(set(ids)) for layer, ids in as_latent_set(features).items()}
    missing = sorted(set(by_layer) - set(saes))
    if missing:
        raise RefusalScopeError(f"no SAE loaded for layer(s) {missing} of the features to explain")
    if not prompts:
        raise RefusalScopeError("the context corpus is empty")
    width = before + 1 + after
    texts = corpus_texts(lm.tokenizer, prompts, chat)
    skip = shared_prefix_length(lm.tokenizer, chat)
    encoders, tops = {}, {}
    for layer, ids in by_layer.items():
        saes[layer].check_latents(ids)
        encoders[layer] = _encoder(saes[layer], torch.tensor(ids, dtype=torch.long), lm.device)
        tops[layer] = _TopN(len(ids), n, width)
    last = max(by_layer)
    n_tokens = 0
    with tqdm(total=len(texts), desc="top contexts", unit="text", disable=not progress, leave=False) as bar:
        for rows in length_sorted_batches(texts, lm.tokenizer, batch_size):
            batch = tokenize(lm.tokenizer, [texts[i] for i in rows], lm.device)
            mask = batch["attention_mask"].bool()
            n_tokens += int(mask.sum())
            # left padding: row r's text starts at T - length; its searched part ``skip`` tokens later
            starts = mask.shape[1] - mask.sum(1, keepdim=True) + skip
            mask = mask & (torch.arange(mask.shape[1], device=mask.device)[None, :] >= starts)
            ids_cpu = batch["input_ids"].cpu().masked_fill(~mask.cpu(), -1)
            # windows run past both ends: pad by ``before`` and ``after`` (token -1, activation 0)
            tok_pad = torch.nn.functional.pad(ids_cpu, (before, after), value=-1)
            row_idx = torch.tensor(rows, dtype=torch.long)

            def record(h: torch.Tensor, layer: int) -> None:
                z = encoders[layer](h.float()) * mask[..., None]  # (B, T, m), padding 0
                z = z.float().cpu()
                vals, pos = z.max(dim=1)  # (B, m)
                zp = torch.nn.functional.pad(z.transpose(1, 2), (before, after))  # (B, m, T + width - 1)
                offs = pos[..., None] + torch.arange(width)  # (B, m, width): window start = pos - before, padded
                win = zp.gather(2, offs)
                tok = tok_pad[:, None, :].expand(-1, z.shape[2], -1).gather(2, offs)
                B = len(rows)
                tops[layer].merge(vals.t(), row_idx[None, :].expand(z.shape[2], B), pos.t(),
                                  win.transpose(0, 1), tok.transpose(0, 1))
                if layer == last:
                    raise StopForward

            hooks = [Hook("resid_post", layer, lambda h, layer=layer: record(h, layer)) for layer in by_layer]
            try:
                with torch.inference_mode(), hooked(lm.model, hooks), batch_context(batch["attention_mask"]):
                    lm.model(**batch, logits_to_keep=1, use_cache=False)
            except StopForward:
                pass
            bar.update(len(rows))
    out: dict[Feature, list[TopContext]] = {}
    for layer, ids in by_layer.items():
        t = tops[layer]
        for j, latent in enumerate(ids):
            found = []
            for k in range(t.vals.shape[1]):
                value = float(t.vals[j, k])
                if not value > 0:
                    continue
                found.append((value, int(t.rows[j, k]), _context(lm.tokenizer, t.tok[j, k], t.win[j, k], before,
                                                                  prompts[int(t.rows[j, k])])))
            found.sort(key=lambda x: (-x[0], x[1]))
            out[Feature(layer, latent)] = [c for _, _, c in found]
    return ContextPass(out, len(texts), n_tokens, time.perf_counter() - start)


def _context(tokenizer, tok: torch.Tensor, win: torch.Tensor, before: int, prompt: str) -> TopContext:
    """A window (token ids, -1 outside the text) as a TopContext with the max-activating token at ``before``."""
    keep = [i for i, t in enumerate(tok.tolist()) if t >= 0]
    tokens = [tokenizer.decode([int(tok[i])]) for i in keep]
    acts = [float(win[i]) for i in keep]
    top_index = keep.index(before)
    return TopContext(tokens=tokens, activations=acts, top_index=top_index, top_token=tokens[top_index],
                      top_value=acts[top_index], prompt=prompt)


def reference_top_contexts(lm: LoadedModel, saes: Mapping[int, Sae], features: Sequence[Feature],
                           prompts: Sequence[str], *, n: int = 5, before: int = 10, after: int = 3,
                           chat: bool = True) -> dict[Feature, list[TopContext]]:
    """The plain form: each text alone (no padding), every layer's full encode, all candidates sorted; positions
    searched and windows cut after the template's shared prefix, as in ``top_contexts``."""
    texts = corpus_texts(lm.tokenizer, prompts, chat)
    skip = shared_prefix_length(lm.tokenizer, chat)
    found: dict[Feature, list[tuple[float, int, TopContext]]] = {f: [] for f in features}
    for row, text in enumerate(texts):
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(lm.device)
        resid: dict[int, torch.Tensor] = {}

        def keep(h, layer):
            resid[layer] = h[0].float()

        hooks = [Hook("resid_post", layer, lambda h, layer=layer: keep(h, layer)) for layer in {f.layer for f in
                                                                                             features}]
        with torch.inference_mode(), hooked(lm.model, hooks):
            lm.model(input_ids=ids, use_cache=False)
        tokens = [lm.tokenizer.decode([t]) for t in ids[0].tolist()]
        codes = {layer: encoder_on(saes[layer], lm.device).encode(h).cpu() for layer, h in resid.items()}  # (T, m)
        for f in features:
            z = codes[f.layer][:, f.latent]  # (T,)
            p = skip + int(z[skip:].argmax()) if len(tokens) > skip else 0
            if len(tokens) <= skip or not float(z[p]) > 0:
                continue
            lo, hi = max(skip, p - before), min(len(tokens), p + after + 1)
            ctx = TopContext(tokens=tokens[lo:hi], activations=z[lo:hi].tolist(), top_index=p - lo,
                             top_token=tokens[p], top_value=float(z[p]), prompt=prompts[row])
            found[f].append((float(z[p]), row, ctx))
    return {f: [c for _, _, c in sorted(v, key=lambda x: (-x[0], x[1]))[:n]] for f, v in found.items()}
