"""Dormant ("hydra") features (paper, "Redundant Features" and Fig. 2): ``refusalscope analyze hydra --run RUN``.

Per prompt and per examined set S (the chosen Stage-2 set; the Stage-3 set when the run has one):
- dormant D = {f ∈ S: max activation over the prompt's positions ≤ ``threshold`` on the unablated prompt}, active
  A = S \\ D;
- the jailbreak with S and with A (without the dormant features), generated and judged through the run's
  completion cache (``StageContext.judged``);
- with A ablated (error term kept, every layer's edit on its resid_post, so upstream ablations change downstream
  latents), which dormant features switch on (activation > ``threshold`` at some position), how strongly, on which
  tokens, and which segment each token belongs to: the first token, the system prompt, the user text, the
  post-instruction template (the template's tokens after the user text) or other template tokens.

A latent's activation under an ablation is the SAE's encoding of the stream arriving at its layer, i.e. *before*
that layer's own edit (``LatentRecorder`` hooks run before the ablation hooks of the same layer): ablating a latent
cannot wake another latent of the same SAE, only latents of later layers.

Attribution of the graph (our choice; the paper draws no graph): for each layer ℓ holding active features of S,
ablate only A ∩ layer ℓ ("A's layer-block") and record the dormant features of layers > ℓ. Every dormant feature B
that switches on gets an edge A → B from every A in that block, with weight = B's max activation under that block's
ablation. A block is ablated alone (not with the blocks below it), so an edge says "this block alone is enough to
wake B"; a feature woken only by several blocks together shows up in ``woken.parquet`` but has no edge.
Across prompts an edge keeps the number of prompts it was found on and its mean and max weight.

Wake scopes (``wake_scope`` option). "set": the set's own dormant features (the paper's redundant features); the
``dormant`` and ``jailbreak`` tables always report this scope. "all" (our choice for the default: the paper's count
and the broader picture from the same forwards) adds every latent of every SAE layer of the run that is off on the
clean prompt (max over positions ≤ ``threshold``) and on under the active-set or a layer-block ablation: newly
active features anywhere downstream. Both are read in the same batched forward (one extra unablated row gives the
clean activations); for "all" only the latents that switch on are kept (sparse), and only at layers above the
lowest ablated layer of their row (below it the stream is unchanged). The ``woken``, ``tokens``, ``segments`` and
``edges`` tables carry a ``scope`` column; ``graph.*`` is the "set" graph, ``graph_all.*`` the "all" graph, and
``graph.png`` draws one panel per scope (the edges table, its streaming and the graphs: ``analysis.hydra_graph``).

Segment shares (our choice, ``shares`` option): a woken feature's activation mass per segment over the positions it
fires on ("activation"), or its number of firing positions per segment ("count"). SAEs with ``Sae.max_norm`` set
(the ones we train) give z = 0 on attention-sink tokens (position 0, and tokens whose norm exceeds their bound), so
for them the first-token share is 0 by construction; the summary says so whenever such SAEs were used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from refusalscope.analysis.finished_run import explicit
from refusalscope.analysis.hydra_graph import (EDGE_COLUMNS, EdgeTotals, arrow_edges, edge_frames, empty_edges,
                                               feature_roles, graph_from_totals, graph_json, named_edges,
                                               plot_graph)
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentAblation, LatentRecorder, encoder_on, reference_ablate
from refusalscope.lm.hooks import Hook, StopForward, batch_context, hooked
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.lm.segments import SEGMENTS, TemplateSpans, prompt_tokens, template_spans
from refusalscope.saes.features import Feature, as_latent_set
from refusalscope.saes.sae import Sae

NEEDS = ("stage2",)
OUT = "analyses/hydra"
SCOPES = ("set", "all")
GRAPH_FILES = {"set": "graph", "all": "graph_all"}
SINK_NOTE = ("the SAEs of layers {layers} set max_norm (ours do): they give z = 0 on attention-sink tokens (position "
             "0 and over-norm tokens), so the first-token share is 0 by construction, not a finding")

# ---- latents under ablations --------------------------------------------------------------------------------------

@dataclass
class Recording:
    """What ``record_with_wakes`` read: ``acts`` (len(sets), T, len(features)) as ``record_under_ablations``, and
    per set the latents of the wake layers that are off on the clean prompt and on with the set ablated:
    ``wakes[i]`` = (features, (T, n) activations)."""

    acts: torch.Tensor
    wakes: list[tuple[list[Feature], torch.Tensor]]


def _wake_hook(sae: Sae, layer: int, low: torch.Tensor, state: dict, found: list, threshold: float):
    """Full encode of one layer's incoming stream; keeps only (row, latent) pairs off on the clean row and on in
    the row, for rows whose lowest ablated layer is below ``layer`` (``low``: per row)."""

    def edit(h):
        z = encoder_on(sae, h.device).encode(h.float())  # (B, T, m)
        peak = z.amax(dim=1)  # (B, m)
        if layer not in state:  # the first batch's row 0 is the unablated prompt
            state[layer] = peak[0] <= threshold
        on = (peak > threshold) & state[layer][None] & (low.to(z.device) < layer)[:, None]
        rows, ids = on.nonzero(as_tuple=True)
        if rows.numel():
            found.append((layer, rows.cpu(), ids.cpu(), z[rows, :, ids].cpu()))
        return None

    return Hook("resid_post", layer, edit)


@torch.inference_mode()
def record_with_wakes(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str, sets: Sequence[Sequence[Feature]],
                      features: Sequence[Feature], *, wake_layers: Sequence[int] = (), threshold: float = 0.0,
                      batch_size: int = 16) -> Recording:
    """Activations of ``features`` at every prompt position with each of ``sets`` ablated, and (``wake_layers``)
    every latent of those layers that the ablation switches on: one forward per ``batch_size`` rows.

    A row per set, all the same prompt so nothing is padded; with ``wake_layers`` the first batch also holds the
    unablated prompt, whose peaks say which latents are off. Each latent is read from the stream entering its
    layer's edit, and the forward stops after the last layer read. Memory: per layer one (B, T, width) encode at a
    time; only the latents that switch on are kept.
    """
    feats = list(features)
    wake_layers = sorted(set(wake_layers))
    for layer in wake_layers:
        if layer not in saes:
            raise RefusalScopeError(f"no SAE for layer {layer}; SAEs are loaded for layers {sorted(saes)}")
    batch1 = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    T = batch1["input_ids"].shape[1]
    out = torch.zeros(len(sets), T, len(feats))
    wakes: list[tuple[list[Feature], torch.Tensor]] = [([], torch.zeros(T, 0)) for _ in sets]
    if not len(sets) or not (feats or wake_layers):
        return Recording(out, wakes)
    wanted = as_latent_set(feats)
    col = {f: j for j, f in enumerate(feats)}
    last = max([*wanted, *wake_layers])
    clean = 1 if wake_layers else 0  # rows: [unablated prompt] + sets
    rows = [()] * clean + [tuple(s) for s in sets]
    state: dict[int, torch.Tensor] = {}
    found: list = []

    def stop(h):
        raise StopForward

    for start in range(0, len(rows), batch_size):
        chunk = [as_latent_set(s) for s in rows[start:start + batch_size]]
        batch = {k: v.expand(len(chunk), -1) for k, v in batch1.items()}
        hooks = []
        if wanted:
            rec = LatentRecorder(saes, wanted)
            hooks += rec.hooks(lm.n_layers)
        if wake_layers:
            low = torch.tensor([min(s, default=lm.n_layers) for s in chunk])
            seen: list = []
            hooks += [_wake_hook(saes[layer], layer, low, state, seen, threshold) for layer in wake_layers]
        ablation = LatentAblation.build(saes, chunk, device=lm.device)
        hooks += [*hooks_for([ablation], lm.n_layers), Hook("resid_post", last, stop)]
        try:
            with hooked(lm.model, hooks), batch_context(batch["attention_mask"]):
                lm.model(**batch, logits_to_keep=1, use_cache=False)
        except StopForward:
            pass
        skip = clean if start == 0 else 0  # the unablated row is not an answer
        for layer, ids in wanted.items():
            z = rec.records[layer][0]  # (B, T, len(ids))
            for j, latent in enumerate(ids):
                out[start + skip - clean:start + len(chunk) - clean, :, col[Feature(layer, latent)]] = z[skip:, :, j]
        if wake_layers:
            found += [(layer, r + start - clean, i, v) for layer, r, i, v in seen]
    if found:  # every (row, layer, latent) once: a row's layer is read in one forward; sorted as Features sort
        layer_of = torch.cat([torch.full_like(r, layer) for layer, r, _, _ in found])
        row_of = torch.cat([r for _, r, _, _ in found])
        latent_of = torch.cat([i for _, _, i, _ in found])
        vals = torch.cat([v for *_, v in found])  # (N, T)
        order = torch.from_numpy(np.lexsort((latent_of.numpy(), layer_of.numpy(), row_of.numpy())))
        row_of, pairs = row_of[order], list(zip(layer_of[order].tolist(), latent_of[order].tolist()))
        vals = vals[order]
        ends = torch.bincount(row_of, minlength=len(sets)).cumsum(0).tolist()
        for i, end in enumerate(ends):
            begin = ends[i - 1] if i else 0
            if end > begin:
                wakes[i] = ([Feature(*x) for x in pairs[begin:end]], vals[begin:end].T.contiguous())
    return Recording(out, wakes)


def record_under_ablations(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str,
                           sets: Sequence[Sequence[Feature]], features: Sequence[Feature],
                           batch_size: int = 16) -> torch.Tensor:
    """Activations of ``features`` at every prompt position with each of ``sets`` ablated: (len(sets), T, n).

    One forward per ``batch_size`` sets (a batch row per set, all the same prompt so nothing is padded); each
    feature is read from the stream entering its layer's edit, and the forward stops after the last layer read.
    """
    return record_with_wakes(lm, saes, prompt, sets, features, batch_size=batch_size).acts


@torch.inference_mode()
def reference_codes(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str, ablate: Sequence[Feature],
                     layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Full ``Sae.encode`` (T, width) of each of ``layers``' resid_post before that layer's edit, every ablated
    layer's resid_post replaced by the paper's formula (``reference_ablate``)."""
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    by_layer = as_latent_set(ablate)
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in sorted(set(layers)):
        hooks.append(Hook("resid_post", layer, lambda h, layer=layer: seen.__setitem__(layer, h[0].float().clone())))
    for layer, latents in sorted(by_layer.items()):
        edit = lambda h, sae=saes[layer], latents=latents: reference_ablate(sae, h, latents).to(h.dtype)  # noqa: E731
        hooks.append(Hook("resid_post", layer, edit))
    with hooked(lm.model, hooks), batch_context(batch["attention_mask"]):
        lm.model(**batch, use_cache=False)
    return {layer: encoder_on(saes[layer], x.device).encode(x).cpu() for layer, x in seen.items()}


def record_reference(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str, ablate: Sequence[Feature],
                     features: Sequence[Feature]) -> torch.Tensor:
    """The plain form of ``record_under_ablations`` for one set: (T, n). Each ablated layer's resid_post is
    replaced by the paper's formula (``reference_ablate``: full encode, masked decode, error added back) and each
    feature is the full ``Sae.encode`` of its layer's resid_post before that replacement."""
    codes = reference_codes(lm, saes, prompt, ablate, [f.layer for f in features])
    cols = [codes[f.layer][:, f.latent] for f in features]
    if not cols:
        return torch.zeros(tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]))["input_ids"].shape[1], 0)
    return torch.stack(cols, dim=-1)


def reference_wakes(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str, ablate: Sequence[Feature],
                    layers: Sequence[int], threshold: float = 0.0) -> dict[Feature, torch.Tensor]:
    """The plain form of ``record_with_wakes``' wakes for one set: every latent of ``layers`` whose max over the
    positions is ≤ ``threshold`` on the unablated prompt and > ``threshold`` with ``ablate`` ablated, from two
    separate unbatched forwards: feature → (T,) activations under the ablation."""
    clean = reference_codes(lm, saes, prompt, (), layers)
    under = reference_codes(lm, saes, prompt, ablate, layers)
    out = {}
    for layer in sorted(set(layers)):
        on = (clean[layer].amax(0) <= threshold) & (under[layer].amax(0) > threshold)
        for latent in torch.nonzero(on).flatten().tolist():
            out[Feature(layer, latent)] = under[layer][:, latent]
    return out


# ---- one prompt ---------------------------------------------------------------------------------------------------

class Firing(BaseModel):
    """A feature off on the clean prompt that switched on: its largest activation and every position where it is on."""

    feature: Feature
    max_act: float
    positions: list[int] = Field(default_factory=list)
    activations: list[float] = Field(default_factory=list)


class BlockWake(BaseModel):
    """Ablating only the active features of one layer (``layer``): which later features switch on (the set's
    dormant ones in ``SetResult.blocks``, any latent off on the clean prompt in ``SetResult.blocks_all``)."""

    layer: int
    ablated: list[Feature]
    woken: list[Firing] = Field(default_factory=list)


class SetResult(BaseModel):
    name: str  # "stage2" | "stage3"
    features: list[Feature]
    clean: list[float]  # max activation on the unablated prompt, per feature of ``features``
    dormant: list[Feature]
    active: list[Feature]
    judge: str
    jailbroken_full: bool
    jailbroken_without_dormant: bool
    completion_full: str
    completion_without_dormant: str
    woken: list[Firing] = Field(default_factory=list)  # scope "set": with every active feature ablated
    blocks: list[BlockWake] = Field(default_factory=list)
    woken_all: list[Firing] = Field(default_factory=list)  # scope "all" (only with wake_scope "all")
    blocks_all: list[BlockWake] = Field(default_factory=list)


class HydraPrompt(BaseModel):
    """``analyses/hydra/prompts/<id>.json``: one prompt's finished analysis, reused while ``settings`` match."""

    id: int
    prompt: str
    settings: dict
    tokens: list[str]
    segments: list[str]
    max_norm_layers: list[int]  # layers of this prompt's features whose SAE sets max_norm
    sets: list[SetResult] = Field(default_factory=list)

    @staticmethod
    def file_name(prompt_id: int) -> str:
        return f"{OUT}/prompts/{int(prompt_id):05d}.json"


def split_dormant(features: Sequence[Feature], clean: Mapping[Feature, float],
                  threshold: float = 0.0) -> tuple[list[Feature], list[Feature]]:
    """(dormant, active): features whose max activation on the unablated prompt is ≤ ``threshold``, and the rest."""
    dormant = [f for f in features if clean[f] <= threshold]
    return dormant, [f for f in features if clean[f] > threshold]


def layer_blocks(active: Sequence[Feature], dormant: Sequence[Feature],
                 top: int | None = None) -> list[tuple[int, list[Feature]]]:
    """(ℓ, A ∩ layer ℓ) for every layer ℓ of the active features below some dormant feature's layer (below
    ``top`` when given: the last SAE layer, for the "all" scope)."""
    top = max((f.layer for f in dormant), default=-1) if top is None else top
    layers = sorted({f.layer for f in active if f.layer < top})
    return [(layer, sorted(f for f in active if f.layer == layer)) for layer in layers]


def firings(acts: torch.Tensor, features: Sequence[Feature], threshold: float = 0.0) -> list[Firing]:
    """The features of ``acts`` (T, n) that exceed ``threshold`` somewhere, with those positions.

    Vectorized: one comparison and one nonzero for all columns (a scope-"all" row holds thousands of woken latents,
    and a loop of small tensor ops per column was most of hydra's time per prompt); the records are built without
    revalidation (their fields are already typed). Same records as a loop over the columns (tested)."""
    on = (acts > threshold).T  # (n, T)
    cols, pos = on.nonzero(as_tuple=True)  # column-major: a column's positions are consecutive and ascending
    if not cols.numel():
        return []
    values = acts.T[cols, pos].tolist()
    peaks = acts.amax(0).tolist()
    counts = torch.bincount(cols, minlength=len(features))
    ends, counts = counts.cumsum(0).tolist(), counts.tolist()
    pos = pos.tolist()
    out = []
    for j, n in enumerate(counts):
        if not n:
            continue
        a, b = ends[j] - n, ends[j]
        out.append(Firing.model_construct(feature=features[j], max_act=peaks[j], positions=pos[a:b],
                                          activations=values[a:b]))
    return out


def hydra_flow(ctx, prompt_id: int, prompt: str, sets: Mapping[str, Sequence[Feature]], *, settings: dict,
               threshold: float = 0.0, spans: TemplateSpans | None = None, wake_scope: str = "set",
               record_batch_size: int | None = None):
    """``analyse_prompt`` as a flow (``StageContext.lockstep``): every set and its active part are one request, so
    several prompts' completions share generation batches (``--prompt-batch``). ``record_batch_size``: rows per
    recording forward (default ``ctx.batch_size``); a group's context has a group-sized ``batch_size``, while the
    recording runs one prompt at a time, so the run passes the per-prompt size (the same batch shapes, hence the
    same values in bf16, as one prompt alone)."""
    if wake_scope not in SCOPES:
        raise RefusalScopeError(f"wake_scope must be one of {', '.join(SCOPES)}, not {wake_scope!r}")
    _, texts, segments = prompt_tokens(ctx.lm.tokenizer, prompt, spans)
    sets = {name: sorted(set(fs)) for name, fs in sets.items() if fs}
    union = sorted({f for fs in sets.values() for f in fs})
    clean = ctx.activations(prompt, union) if union else {}
    split = {name: split_dormant(fs, clean, threshold) for name, fs in sets.items()}
    judged = yield [(prompt, x) for name, fs in sets.items() for x in (fs, split[name][1])]
    # rows: every set's A and its layer-blocks, deduplicated
    rows: dict[tuple[Feature, ...], int] = {}
    plan, plan_all = {}, {}
    top = max(ctx.saes) if ctx.saes else -1
    for name, (dormant, active) in split.items():
        if dormant and active:
            plan[name] = layer_blocks(active, dormant)
        if wake_scope == "all" and active:
            plan_all[name] = layer_blocks(active, (), top=top)
        for blocks in (plan.get(name), plan_all.get(name)):
            if blocks is not None:
                for key in [tuple(active), *(tuple(b) for _, b in blocks)]:
                    rows.setdefault(key, len(rows))
    watched = sorted({f for name in plan for f in split[name][0]})
    low = min((f.layer for name in plan_all for f in split[name][1]), default=top)
    wake_layers = [layer for layer in ctx.saes if layer > low] if plan_all else []
    got = record_with_wakes(ctx.lm, ctx.saes, prompt, list(rows), watched, wake_layers=wake_layers,
                            threshold=threshold, batch_size=record_batch_size or ctx.batch_size)
    acts = got.acts
    col = {f: j for j, f in enumerate(watched)}
    results = []
    for k, (name, fs) in enumerate(sets.items()):
        dormant, active = split[name]
        full, without = judged[2 * k], judged[2 * k + 1]
        res = SetResult(name=name, features=fs, clean=[float(clean[f]) for f in fs], dormant=dormant, active=active,
                        judge=ctx.judge.name, jailbroken_full=full.jailbroken,
                        jailbroken_without_dormant=without.jailbroken, completion_full=full.completion,
                        completion_without_dormant=without.completion)
        if name in plan:
            a = acts[rows[tuple(active)]]
            res.woken = firings(a[:, [col[f] for f in dormant]], dormant, threshold)
            for layer, block in plan[name]:
                later = [f for f in dormant if f.layer > layer]
                b = acts[rows[tuple(block)]][:, [col[f] for f in later]]
                res.blocks.append(BlockWake(layer=layer, ablated=block, woken=firings(b, later, threshold)))
        if name in plan_all:
            res.woken_all = firings(got.wakes[rows[tuple(active)]][1], got.wakes[rows[tuple(active)]][0], threshold)
            for layer, block in plan_all[name]:
                fs_b, acts_b = got.wakes[rows[tuple(block)]]
                res.blocks_all.append(BlockWake(layer=layer, ablated=block, woken=firings(acts_b, fs_b, threshold)))
        results.append(res)
    max_norm = sorted({layer for layer in {f.layer for f in union} | set(wake_layers)
                       if ctx.saes[layer].max_norm is not None})
    return HydraPrompt(id=prompt_id, prompt=prompt, settings=settings, tokens=texts, segments=segments,
                       max_norm_layers=max_norm, sets=results)


def analyse_prompt(ctx, prompt_id: int, prompt: str, sets: Mapping[str, Sequence[Feature]], *, settings: dict,
                   threshold: float = 0.0, spans: TemplateSpans | None = None,
                   wake_scope: str = "set") -> HydraPrompt:
    """Dormant features, the jailbreak with and without them, what wakes them: one prompt, every set in ``sets``.

    ``ctx`` is a ``StageContext``; all ablated forwards of the prompt (every set's A and layer-blocks) run as rows
    of one batch (``record_with_wakes``). ``wake_scope`` "all" also keeps every latent of ``ctx.saes`` that those
    ablations switch on (``SetResult.woken_all``/``blocks_all``), read in the same forwards."""
    return ctx.lockstep([hydra_flow(ctx, prompt_id, prompt, sets, settings=settings, threshold=threshold,
                                    spans=spans, wake_scope=wake_scope)])[0]


# ---- tables -------------------------------------------------------------------------------------------------------

def _mass(values: Sequence[float], shares: str) -> list[float]:
    return [1.0] * len(values) if shares == "count" else [float(v) for v in values]


def computed_scopes(results: Sequence[HydraPrompt]) -> tuple[str, ...]:
    """"set", and "all" when some prompt was analysed with wake_scope "all"."""
    has_all = any(s.woken_all or s.blocks_all for r in results for s in r.sets) or \
        any(r.settings.get("wake_scope") == "all" for r in results)
    return ("set", "all") if has_all else ("set",)


def tables(results: Sequence[HydraPrompt], shares: str = "activation",
           scopes: Sequence[str] | None = None, edges: bool = True) -> dict[str, pd.DataFrame]:
    """dormant, jailbreak, woken, tokens, segments and (``edges``) edges tables of the finished prompts; woken,
    tokens, segments and edges carry the wake ``scope`` ("set", "all"; default: those the results hold).

    The edges table of a large run does not fit in memory (scope "all": every ablated feature of a layer-block x
    every latent it wakes, 340,000 rows per prompt on average on the default model); ``write_outputs`` streams it
    (``edge_frames``), and the graphs aggregate it as it goes."""
    scopes = tuple(scopes or computed_scopes(results))
    dormant, jail, woken, tokens = [], [], [], []
    for r in results:
        for s in r.sets:
            clean = dict(zip(s.features, s.clean))
            woke = {w.feature for w in s.woken}
            dormant += [{"id": r.id, "set": s.name, "feature": str(f), "layer": f.layer, "latent": f.latent,
                         "clean_act": clean[f], "woken": f in woke} for f in s.dormant]
            jail.append({"id": r.id, "set": s.name, "size": len(s.features), "n_dormant": len(s.dormant),
                         "n_active": len(s.active), "jailbroken_full": s.jailbroken_full,
                         "jailbroken_without_dormant": s.jailbroken_without_dormant, "judge": s.judge,
                         "completion_full": s.completion_full,
                         "completion_without_dormant": s.completion_without_dormant})
            for scope, fired, blocks in (("set", s.woken, s.blocks), ("all", s.woken_all, s.blocks_all)):
                if scope not in scopes:
                    continue
                for w in fired:
                    segs = [r.segments[p] for p in w.positions]
                    mass = _mass(w.activations, shares)
                    total = sum(mass) or 1.0
                    top = w.positions[max(range(len(w.positions)), key=lambda i: w.activations[i])]
                    woken.append({"id": r.id, "set": s.name, "scope": scope, "feature": str(w.feature),
                                  "layer": w.feature.layer, "latent": w.feature.latent, "max_act": w.max_act,
                                  "n_positions": len(w.positions), "top_token": r.tokens[top], "top_position": top,
                                  **{f"share_{g}": sum(m for m, x in zip(mass, segs) if x == g) / total
                                     for g in SEGMENTS}})
                    tokens += [{"id": r.id, "set": s.name, "scope": scope, "feature": str(w.feature), "position": p,
                                "token": r.tokens[p], "segment": r.segments[p], "activation": a}
                               for p, a in zip(w.positions, w.activations)]
    cols = {
        "dormant": ["id", "set", "feature", "layer", "latent", "clean_act", "woken"],
        "jailbreak": ["id", "set", "size", "n_dormant", "n_active", "jailbroken_full", "jailbroken_without_dormant",
                      "judge", "completion_full", "completion_without_dormant"],
        "woken": ["id", "set", "scope", "feature", "layer", "latent", "max_act", "n_positions", "top_token",
                  "top_position", *(f"share_{g}" for g in SEGMENTS)],
        "tokens": ["id", "set", "scope", "feature", "position", "token", "segment", "activation"],
    }
    out = {name: pd.DataFrame(rows, columns=cols[name])
           for name, rows in (("dormant", dormant), ("jailbreak", jail), ("woken", woken), ("tokens", tokens))}
    out["segments"] = segment_shares(out["tokens"], shares, scopes)
    if edges:
        out["edges"] = pd.concat([named_edges(f) for f in edge_frames(results, scopes)] or [empty_edges()],
                                 ignore_index=True)
    return out


def segment_shares(tokens: pd.DataFrame, shares: str = "activation",
                   scopes: Sequence[str] = ("set",)) -> pd.DataFrame:
    """Per wake scope, set group ("all", "stage2", "stage3") and segment: firing positions, activation mass and
    the share (of the mass, or of the positions when ``shares`` is "count") over every woken feature of every
    prompt. ``tokens`` without a ``scope`` column counts as scope "set"."""
    if "scope" not in tokens.columns:
        tokens = tokens.assign(scope="set")
    rows = []
    for scope in scopes:
        part_s = tokens[tokens["scope"] == scope]
        groups = [("all", part_s)] + [(name, part) for name, part in part_s.groupby("set", sort=True)]
        for name, part in groups:
            total = float(part["activation"].sum()) if shares == "activation" else float(len(part))
            for g in SEGMENTS:
                sel = part[part["segment"] == g]
                mass = float(sel["activation"].sum())
                amount = mass if shares == "activation" else float(len(sel))
                rows.append({"scope": scope, "set": name, "segment": g, "n_positions": len(sel), "activation": mass,
                             "share": amount / total if total else 0.0})
    return pd.DataFrame(rows, columns=["scope", "set", "segment", "n_positions", "activation", "share"])


# ---- the analysis -------------------------------------------------------------------------------------------------

def prompt_settings(finished, settings, sets: Mapping[str, Sequence[Feature]]) -> dict:
    """What a prompt's result depends on; a rerun recomputes a prompt whose stored settings differ."""
    return {"sets": {name: [str(f) for f in fs] for name, fs in sets.items()},
            "threshold": settings.threshold,
            "wake_scope": settings.wake_scope,
            "judge": settings.judge or finished.config.get("judge", "substring"),
            "max_new_tokens": settings.max_new_tokens or finished.config.get("max_new_tokens"),
            "dtype": explicit(settings, "dtype") or finished.config.get("dtype", "auto")}


def run(finished, settings, progress: bool = True) -> dict:
    """Every prompt (resumable: finished prompts with the same settings are read back), then the tables, the graphs
    (GraphML, node-link JSON per scope, one PNG) and the summary, all under ``analyses/hydra/``."""
    from tqdm.auto import tqdm

    use = [name for name in ("stage2", "stage3") if name in settings.sets]
    if not use:
        raise RefusalScopeError("--sets names no feature set; choose stage2 and/or stage3")
    if use == ["stage3"]:
        finished.require("hydra", "stage3")
    use = [name for name in use if name != "stage3" or finished.has("stage3")]
    records = finished.records[:settings.limit] if settings.limit else finished.records
    store = finished.store
    ctx_cache: list = []
    spans_cache: list = []

    from refusalscope.pipeline.steps import groups

    group = finished.prompt_batch(settings.prompt_batch)
    per_prompt_batch = finished.batch_size(explicit(settings, "batch_size"), 1)

    def context():
        if not ctx_cache:
            ctx_cache.append(finished.context(device=explicit(settings, "device"), dtype=explicit(settings, "dtype"),
                                              judge=settings.judge, max_new_tokens=settings.max_new_tokens,
                                              batch_size=finished.batch_size(explicit(settings, "batch_size"),
                                                                             group)))
            spans_cache.append(template_spans(ctx_cache[0].lm.tokenizer))
        return ctx_cache[0]

    done: dict[int, HydraPrompt] = {}
    todo = []
    for rec in records:
        sets = {"stage2": finished.stage2_set(rec), "stage3": finished.stage3_set(rec.id)}
        sets = {name: sets[name] for name in use}
        key = prompt_settings(finished, settings, sets)
        old = _read(store, HydraPrompt.file_name(rec.id))
        if old is not None and old.settings == key and old.prompt == rec.prompt:
            done[rec.id] = old
        else:
            todo.append((rec, sets, key))
    reused = len(done)
    with tqdm(total=len(records), initial=reused, desc="hydra", unit="prompt", disable=not progress,
              dynamic_ncols=True) as bar:
        # a group's completions share generation batches; each prompt's file is written as its group ends
        for part in groups(todo, group):
            ctx = context()
            flows = [hydra_flow(ctx, rec.id, rec.prompt, sets, settings=key, threshold=settings.threshold,
                                spans=spans_cache[0], wake_scope=settings.wake_scope,
                                record_batch_size=per_prompt_batch) for rec, sets, key in part]
            for (rec, _, _), res in zip(part, ctx.lockstep(flows)):
                # our choice: compact JSON straight from pydantic (a prompt holds tens of thousands of firings;
                # indented dicts took 0.2 s per prompt on the default model and three times the disk)
                store.write_text(HydraPrompt.file_name(rec.id), res.model_dump_json())
                done[rec.id] = res
            bar.update(len(part))
    return write_outputs(store, [done[rec.id] for rec in records], settings, reused)


def _read(store, name: str) -> HydraPrompt | None:
    if not store.exists(name):
        return None
    try:
        return HydraPrompt.model_validate_json(store.path(name).read_bytes())
    except Exception:  # an older layout or a damaged file: recompute the prompt
        return None


def write_outputs(store, results: Sequence[HydraPrompt], settings, reused: int = 0) -> dict:
    scopes = ("set", "all") if settings.wake_scope == "all" else ("set",)
    frames = tables(results, settings.shares, scopes, edges=False)
    for name, frame in frames.items():
        store.write_table(f"{OUT}/{name}.parquet", frame)
    # the edges: one prompt at a time, into edges.parquet and each scope's totals (the whole table can be tens of GB)
    names = sorted({s.name for r in results for s in r.sets})
    totals = {scope: EdgeTotals(names) for scope in SCOPES}

    def stream():
        for frame in edge_frames(results, scopes):
            for scope, part in frame.groupby("scope", sort=False, observed=True):
                totals[scope].add(part)
            yield arrow_edges(frame)

    store.write_table_parts(f"{OUT}/edges.parquet", stream(), EDGE_COLUMNS)
    roles = feature_roles(results)
    import networkx as nx

    graphs = {}
    for scope in SCOPES:  # both files always, so no stale "all" graph outlives a rerun with wake_scope "set"
        g = graph_from_totals(totals[scope], scope=scope, min_prompts=settings.min_edge_prompts, roles=roles,
                              max_edges=settings.graph_max_edges if scope == "all" else None)
        g.graph["computed"] = scope in scopes
        tmp = store.path(f"{OUT}/.{GRAPH_FILES[scope]}.graphml.tmp")  # written whole, then renamed (as RunStore)
        nx.write_graphml(g, str(tmp))
        tmp.replace(store.path(f"{OUT}/{GRAPH_FILES[scope]}.graphml"))
        store.write_json(f"{OUT}/{GRAPH_FILES[scope]}.json", graph_json(g))
        if scope in scopes:
            graphs[scope] = g
    store.save_figure(f"{OUT}/graph.png", plot_graph(graphs, settings.draw_max_edges))
    return summarize(results, frames, graphs, settings.shares) | {"wake_scope": settings.wake_scope,
                                                                   "reused": reused}


def _scope_summary(frames: Mapping[str, pd.DataFrame], scope: str, g) -> dict:
    woken = frames["woken"]
    woken = woken[woken["scope"] == scope] if "scope" in woken.columns else woken
    tokens = frames["tokens"]
    tokens = tokens[tokens["scope"] == scope] if "scope" in tokens.columns else tokens
    seg = frames["segments"]
    seg = seg[seg["scope"] == scope] if "scope" in seg.columns else seg
    overall = seg[seg["set"] == "all"]
    return {"woken": int(len(woken)), "woken_features": int(woken["feature"].nunique()),
            "woken_by_set": {name: int(n) for name, n in woken.groupby("set", sort=True).size().items()},
            "segment_shares": ({row.segment: float(row.share) for row in overall.itertuples()} if len(tokens) else {}),
            "graph": {"nodes": g.number_of_nodes(), "edges": g.number_of_edges()}}


def summarize(results: Sequence[HydraPrompt], frames: Mapping[str, pd.DataFrame], graphs, shares: str) -> dict:
    """Headline numbers. The top-level woken / segment_shares / graph are scope "set" (the paper's); ``scopes``
    holds them for every scope computed (``graphs``: scope → DiGraph, or the "set" DiGraph alone)."""
    graphs = graphs if isinstance(graphs, dict) else {"set": graphs}
    jail = frames["jailbreak"]
    with_d = jail[jail["n_dormant"] > 0]
    layers = sorted({layer for r in results for layer in r.max_norm_layers})
    scopes = {scope: _scope_summary(frames, scope, graphs[scope]) for scope in SCOPES if scope in graphs}
    by_set = {}
    for name, part in jail.groupby("set", sort=True):
        d = part[part["n_dormant"] > 0]
        by_set[name] = {"sets": int(len(part)), "sets_with_dormant": int(len(d)),
                        "dormant": int(part["n_dormant"].sum()),
                        "woken": scopes["set"]["woken_by_set"].get(name, 0),
                        "jailbroken_full": int(d["jailbroken_full"].sum()),
                        "jailbroken_without_dormant": int(d["jailbroken_without_dormant"].sum())}
    return {
        "judge": ", ".join(sorted(set(jail["judge"]))) or None,
        "prompts": len(results),
        "sets": int(len(jail)),
        "sets_with_dormant": int(len(with_d)),
        "dormant": int(jail["n_dormant"].sum()),
        "woken": scopes["set"]["woken"],
        "jailbroken_full": int(with_d["jailbroken_full"].sum()),
        "jailbroken_without_dormant": int(with_d["jailbroken_without_dormant"].sum()),
        "by_set": by_set,
        "shares": shares,
        "segment_shares": scopes["set"]["segment_shares"],
        "sink_note": SINK_NOTE.format(layers=",".join(map(str, layers))) if layers else None,
        "graph": scopes["set"]["graph"],
        "scopes": scopes,
    }


def _shares_text(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:.2f}" for k, v in shares.items()) or "none fired"


def summary_lines(summary: dict) -> list[str]:
    s = summary
    lines = [
        f"hydra: {s['prompts']} prompts, {s['sets']} feature sets; {s['sets_with_dormant']} hold dormant features "
        f"({s['dormant']} in all), {s['woken']} of them switch on once the active features are ablated",
        f"jailbroken (judge {s['judge']}), of the {s['sets_with_dormant']} sets with dormant features: "
        f"{s['jailbroken_full']} with them, {s['jailbroken_without_dormant']} without them",
        f"woken-feature {s['shares']} share by segment (scope set): {_shares_text(s.get('segment_shares', {}))}",
    ]
    scopes = s.get("scopes", {})
    if "all" in scopes:
        a = scopes["all"]
        lines += [f"scope all: {a['woken']} (set, latent) wakes of {a['woken_features']} distinct latents off on the "
                  f"clean prompt switch on under the active-set or a layer-block ablation",
                  f"woken-latent {s['shares']} share by segment (scope all): {_shares_text(a['segment_shares'])}"]
    if s.get("sink_note"):
        lines.append(f"note: {s['sink_note']}")
    g = s.get("graph", {})
    lines.append(f"graph (layer-block ablation → woken feature), scope set: {g.get('edges', 0)} edges between "
                 f"{g.get('nodes', 0)} features; graph.graphml, graph.json, graph.png")
    if "all" in scopes:
        ga = scopes["all"]["graph"]
        lines.append(f"graph, scope all: {ga['edges']} edges between {ga['nodes']} features; graph_all.graphml, "
                     f"graph_all.json, graph.png")
    return lines
