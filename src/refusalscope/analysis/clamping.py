"""Clamping (paper, Tables 5/6): the redundant features, clamped to fixed values on benign prompts, make the model
refuse them. h' = h + (v − z) W_dec[f] at the chosen position (``LatentClamp``, error term kept), every value of
``values`` (2, 4, …, 10), on the first ``n_prompts`` benign prompts; completions are generated and judged.

The redundant features are the ones the hydra analysis saw waking up (``analyses/hydra/woken.parquet``); when it
woke none, its dormant features (``dormant.parquet``) are clamped instead, and the summary says so.

Two position modes:
- ``first``: each prompt's first token, as in the paper (clamped at <bos>). Our SAEs treat attention-sink tokens
  (position 0 included) as outside their domain, so z = 0 there and the clamp adds v·W_dec; that is still a
  valid intervention on the residual stream, only not one the SAE would read back.
- ``fired``: the token where the feature fired in the hydra analysis (its highest activation). Our choice for
  carrying that token to a benign prompt: a template token after the instruction keeps its offset from the end
  (prompts are left-padded, so negative offsets index the same template tokens), a template token before the
  instruction keeps its index from the first token, and a token inside the instruction keeps its distance from
  the instruction's end (clipped to its first token). A feature with no recorded firing position is clamped at
  the last token.

``refusalscope analyze clamp --run RUN``. Completions go into the run's completion cache under a key holding the
clamp (mode, value, sites), so a rerun only judges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.data import load_prompts
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions.latents import LatentClamp
from refusalscope.judges import check_judge_name
from refusalscope.lm.inference import generate
from refusalscope.lm.prompts import format_chat, post_instruction_positions
from refusalscope.saes.features import Feature, as_latent_set
from refusalscope.saes.sae import Sae

NEEDS = ("stage2", "hydra")
OUT = "analyses/clamp"
HYDRA = "analyses/hydra"


# ---- positions ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """Where one feature is clamped: ``anchor`` "first" (first real token), "start" (``offset`` tokens after the
    first real token) or "end" (``offset`` < 0 from the end of the prompt)."""

    feature: Feature
    anchor: str
    offset: int = 0


def template_lengths(tokenizer) -> tuple[int, int]:
    """(tokens of the chat template before the instruction, tokens after it)."""
    n_suffix = len(post_instruction_positions(tokenizer))
    n_empty = len(tokenizer.encode(format_chat(tokenizer, [""])[0], add_special_tokens=False))
    return max(n_empty - n_suffix, 0), n_suffix


def n_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer.encode(format_chat(tokenizer, [prompt])[0], add_special_tokens=False))


BEFORE_INSTRUCTION = ("first", "system", "template")  # hydra's segments of the template before the user text
SEGMENTS = (*BEFORE_INSTRUCTION, "user", "post_instruction")


def fired_site(feature: Feature, position: int, length: int, n_prefix: int, n_suffix: int,
               segment: str | None = None) -> Site:
    """The site of a feature that fired at ``position`` (index into its unpadded prompt of ``length`` tokens, or
    a negative offset from its end); see the module docstring for the mapping. Hydra's ``segment`` of the token
    decides before/inside/after the instruction when given; else the template lengths do."""
    offset = position - length if position >= 0 else position
    if segment in BEFORE_INSTRUCTION or (segment not in SEGMENTS and offset < -n_suffix and length + offset < n_prefix):
        return Site(feature, "start", length + offset)  # the template before the instruction: same index
    return Site(feature, "end", offset)  # after the instruction: same template token; inside: same distance


def resolve(site: Site, length: int, n_prefix: int) -> int:
    """The site's negative offset in a prompt of ``length`` tokens (valid in any left-padded batch)."""
    if site.anchor == "first":
        return -length
    if site.anchor == "start":
        return min(site.offset, length - 1) - length
    return max(site.offset, n_prefix - length, -length)  # no earlier than the instruction's first token


def clamp_interventions(saes: Mapping[int, Sae], rows: Sequence[tuple[float, Mapping[Feature, int]]],
                        device: torch.device | None = None) -> list[LatentClamp]:
    """Per-row clamps: row r sets each of its features f to its value at its offset ``rows[r][1][f]``.

    One ``LatentClamp`` per (value, offset), each carrying one latent set per row (empty for the rows it does not
    touch), so rows with different values, prompts and positions share one batch.
    """
    groups: dict[tuple[float, int], list[list[Feature]]] = {}
    for r, (value, sites) in enumerate(rows):
        for f, offset in sites.items():
            groups.setdefault((float(value), int(offset)), [[] for _ in rows])[r].append(f)
    return [LatentClamp.build(saes, [as_latent_set(fs) for fs in per_row], value, positions=(offset,), device=device)
            for (value, offset), per_row in sorted(groups.items())]


# ---- the redundant features and where they fired -------------------------------------------------------------------

def _table(finished: FinishedRun, name: str) -> pd.DataFrame:
    path = f"{HYDRA}/{name}"
    table = finished.store.read_table(path) if finished.store.exists(path) else pd.DataFrame()
    # hydra's scope "all" holds any latent an ablation woke; the redundant features are the sets' own (scope "set")
    return table[table["scope"] == "set"] if "scope" in table.columns else table


def redundant_features(finished: FinishedRun) -> tuple[list[Feature], str]:
    """The hydra analysis' woken features, else its dormant ones: (features, "woken" | "dormant")."""
    for name, source in (("woken.parquet", "woken"), ("dormant.parquet", "dormant")):
        table = _table(finished, name)
        if "feature" in table.columns and len(table):
            return sorted({Feature.parse(f) for f in table.feature}), source
    raise RefusalScopeError(f"the hydra analysis of {finished.store.root} found no woken or dormant features; "
                            "there is nothing to clamp")


def firings(finished: FinishedRun, features: Sequence[Feature]) -> dict[Feature, dict]:
    """Per feature, its strongest firing recorded by hydra: id, position, token, segment, activation.

    Read defensively: ``tokens.parquet`` (id, feature, position, token, segment, activation) first, else
    ``woken.parquet``'s top_position / top_token / max_act; features with neither are left out.
    """
    out: dict[Feature, dict] = {}
    tokens = _table(finished, "tokens.parquet")
    if {"feature", "position"} <= set(tokens.columns) and len(tokens):
        if "activation" in tokens.columns:
            tokens = tokens.sort_values("activation", ascending=False, kind="stable")
        for row in tokens.drop_duplicates("feature").to_dict("records"):
            out[Feature.parse(row["feature"])] = {"id": row.get("id"), "position": row["position"],
                                                  "token": row.get("token"), "segment": row.get("segment"),
                                                  "activation": row.get("activation")}
    woken = _table(finished, "woken.parquet")
    if {"feature", "top_position"} <= set(woken.columns) and len(woken):
        if "max_act" in woken.columns:
            woken = woken.sort_values("max_act", ascending=False, kind="stable")
        for row in woken.drop_duplicates("feature").to_dict("records"):
            out.setdefault(Feature.parse(row["feature"]),
                           {"id": row.get("id"), "position": row["top_position"], "token": row.get("top_token"),
                            "segment": row.get("segment"), "activation": row.get("max_act")})
    wanted = set(features)
    return {f: v for f, v in out.items() if f in wanted and v["position"] is not None
            and not (isinstance(v["position"], float) and math.isnan(v["position"]))}


def fired_sites(finished: FinishedRun, features: Sequence[Feature], tokenizer) -> tuple[list[Site], pd.DataFrame]:
    """Each feature's "fired" site, and a table of how it was found (sites.parquet)."""
    n_prefix, n_suffix = template_lengths(tokenizer)
    prompts = {rec.id: rec.prompt for rec in finished.records}
    fired = firings(finished, features)
    sites, rows = [], []
    for f in features:
        info = fired.get(f)
        row = {"feature": str(f), "layer": f.layer, "latent": f.latent, "id": None, "position": None, "token": None,
               "segment": None, "activation": None, "token_match": None, "note": ""}
        site = Site(f, "end", -1)
        if info is None:
            row["note"] = "no firing position recorded: last token"
        else:
            pos = int(info["position"])
            row.update({k: info[k] for k in ("id", "token", "segment", "activation")}, position=pos)
            pid = None if info["id"] is None or pd.isna(info["id"]) else int(info["id"])
            if pid in prompts:
                ids = tokenizer.encode(format_chat(tokenizer, [prompts[pid]])[0], add_special_tokens=False)
                seg = info["segment"] if isinstance(info["segment"], str) else None
                site = fired_site(f, pos, len(ids), n_prefix, n_suffix, seg)
                if info["token"] is not None and -len(ids) <= pos < len(ids):
                    row["token_match"] = tokenizer.decode([ids[pos]]).strip() == str(info["token"]).strip()
            elif pos < 0:
                site = Site(f, "end", pos)
            else:
                row["note"] = "firing prompt not in the run: last token"
        sites.append(site)
        rows.append({**row, "anchor": site.anchor, "offset": site.offset})
    return sites, pd.DataFrame(rows)


# ---- the analysis -------------------------------------------------------------------------------------------------

def plot_clamp(rates: pd.DataFrame, judge: str):
    """Refusal rate of the benign prompts per clamp value and mode (paper, Tables 5/6 as a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = {"first": "first token", "fired": "token where it fired"}
    for mode, part in rates[rates["mode"] != "none"].groupby("mode"):
        ax.plot(part.value, part.refusal_rate, marker="o", label=labels.get(mode, mode))
    base = rates[rates["mode"] == "none"]
    if len(base):
        ax.axhline(float(base.refusal_rate.iloc[0]), color="grey", ls="--", lw=1, label="no clamp")
    ax.set_xlabel("clamp value")
    ax.set_ylabel(f"refusal rate ({judge})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Redundant features clamped on benign prompts")
    fig.tight_layout()
    return fig


def run(finished: FinishedRun, settings, progress: bool = True) -> dict:
    if settings.judge:
        check_judge_name(settings.judge)
    if not settings.values or not settings.modes:
        raise RefusalScopeError("--values and --modes need at least one entry each")
    features, source = redundant_features(finished)
    benign = load_prompts(settings.prompts, data_dir=settings.data_dir or finished.data_dir,
                          limit=settings.n_prompts).texts  # our choice: the first N, in file order
    ctx = finished.context(device=settings.device, dtype=settings.dtype, judge=settings.judge,
                           max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                           layers=sorted({f.layer for f in features}))
    tok = ctx.lm.tokenizer
    n_prefix, _ = template_lengths(tok)
    sites = {"first": [Site(f, "first") for f in features]}
    fired, site_table = fired_sites(finished, features, tok)
    sites["fired"] = fired
    finished.store.write_table(f"{OUT}/sites.parquet", site_table)

    # rows: (mode, value, prompt); mode "none" is the unclamped completion (shared with the stages' cache key)
    rows = [("none", math.nan, p) for p in benign]
    rows += [(m, float(v), p) for m in settings.modes for v in settings.values for p in benign]
    # eager even when the run compiles generation (its key says so): clamps act on prompt positions only, and
    # every chunk's different set of clamp hooks would compile a new decode step for nothing
    gen = ctx.eager_generation_settings
    row_sets, row_settings = [], []
    for mode, value, _ in rows:
        where = [[str(s.feature), s.anchor, s.offset] for s in sites.get(mode, [])]
        spec = {"mode": mode, "value": value, "sites": where}
        row_sets.append([] if mode == "none" else features)
        row_settings.append(gen if mode == "none" else {**gen, "clamp": spec})
    keys = [ctx.cache.key(p, fs, st) for (_, _, p), fs, st in zip(rows, row_sets, row_settings)]
    known = ctx.cache.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in known]
    lengths = {p: n_tokens(tok, p) for p in benign}
    with tqdm(total=len(todo), desc="clamp", unit="completion", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), ctx.batch_size):  # one batch at a time, cached as it finishes
            chunk = todo[start:start + ctx.batch_size]
            spec_rows = []
            for i in chunk:
                mode, value, prompt = rows[i]
                offsets = {} if mode == "none" else {s.feature: resolve(s, lengths[prompt], n_prefix)
                                                     for s in sites[mode]}
                spec_rows.append((0.0 if mode == "none" else value, offsets))
            clamps = clamp_interventions(ctx.saes, spec_rows, ctx.lm.device)
            outs = generate(ctx.lm, [rows[i][2] for i in chunk], max_new_tokens=ctx.max_new_tokens,
                            batch_size=len(chunk), interventions=clamps, progress=False)
            ctx.cache.put_many([(keys[i], rows[i][2], row_sets[i], row_settings[i], o) for i, o in zip(chunk, outs)])
            known.update({keys[i]: o for i, o in zip(chunk, outs)})
            bar.update(len(chunk))

    completions = [known[k] for k in keys]
    verdicts = ctx.judge.judge([r[2] for r in rows], completions)
    judge = ctx.judge.name
    table = pd.DataFrame([{"mode": m, "value": v, "prompt": p, "completion": c, "refused": vd.refused,
                           "degenerate": vd.degenerate, "judge": judge, "n_features": len(fs)}
                          for (m, v, p), fs, c, vd in zip(rows, row_sets, completions, verdicts)])
    finished.store.write_table(f"{OUT}/completions.parquet", table)
    rates = (table.groupby(["mode", "value"], dropna=False, sort=False)
             .agg(n=("prompt", "count"), refusal_rate=("refused", "mean"), degenerate_rate=("degenerate", "mean"))
             .reset_index())
    finished.store.write_table(f"{OUT}/refusal_rates.parquet", rates)
    finished.store.save_figure(f"{OUT}/clamp.png", plot_clamp(rates, judge))
    clamped = rates[rates["mode"] != "none"]
    return {"judge": judge, "source": source, "n_features": len(features),
            "features": [str(f) for f in features], "prompts": settings.prompts, "n_prompts": len(benign),
            "baseline_refusal_rate": float(rates[rates["mode"] == "none"].refusal_rate.iloc[0]),
            "refusal_rate": {m: {f"{v:g}": float(r) for v, r in zip(part.value, part.refusal_rate)}
                             for m, part in clamped.groupby("mode", sort=False)},
            "fired_without_position": int((site_table.note != "").sum())}


def summary_lines(summary: dict) -> list[str]:
    labels = {"first": "first token", "fired": "token where it fired"}
    lines = [f"clamp (judge {summary['judge']}): {summary['n_features']} {summary['source']} features clamped on "
             f"{summary['n_prompts']} benign prompts ({summary['prompts']})"]
    if summary["source"] == "dormant":
        lines.append("  hydra woke no features: the dormant features were clamped instead")
    lines.append(f"  refusal rate without clamp: {summary['baseline_refusal_rate']:.2f}")
    for mode, rates in summary["refusal_rate"].items():
        lines.append(f"  refusal rate at the {labels.get(mode, mode)}, by value: "
                     + ", ".join(f"{v}: {r:.2f}" for v, r in rates.items()))
    if summary.get("fired_without_position"):
        lines.append(f"  {summary['fired_without_position']} feature(s) had no firing position: clamped at the last "
                     "token in mode 'fired'")
    lines.append(f"  → {OUT}/ (completions.parquet, refusal_rates.parquet, sites.parquet, clamp.png)")
    return lines
