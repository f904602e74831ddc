"""Controls (paper, Fig. 6 and the random control of Stage 2): equal-size random active features, and the O'Brien
et al. baseline, which ablates every SAE feature active on at least k tokens of the prompt, swept over k.

``refusalscope analyze controls --run RUN``. Every ablated set goes through the run's completion cache, so the
Stage-2 and random sets the pipeline already generated are only judged again, not generated; each prompt's
result is one file (``analyses/controls/prompts/<id>.json``), reused on a rerun with the same options.
The paper reports a maximum ASR of 0.10 (Gemma-2-2B) and 0.07 (LLaMA-3.1-8B) for this baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.analysis.finished_run import FinishedRun, explicit
from refusalscope.config import parse_layers
from refusalscope.errors import RefusalScopeError
from refusalscope.interventions import hooks_for
from refusalscope.interventions.latents import LatentRecorder, encoder_on
from refusalscope.judges import check_judge_name
from refusalscope.lm.hooks import Hook, batch_context, hooked
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import format_chat, tokenize
from refusalscope.saes.features import Feature, feature_strings
from refusalscope.saes.sae import Sae
from refusalscope.store import digest

NEEDS = ("stage2",)
OUT = "analyses/controls"
PAPER_MAX_ASR = {"Gemma-2-2B": 0.10, "LLaMA-3.1-8B": 0.07}  # paper, Fig. 6


# ---- the math ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def token_counts(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str) -> dict[int, torch.Tensor]:
    """On how many tokens of the chat-formatted prompt each latent is active (z > 0), per layer: (width,) long.

    Our choice: every position of the formatted prompt counts (template tokens included), the positions the
    pipeline's ablations edit; attention-sink tokens never count, since our SAEs give z = 0 there.
    """
    rec = LatentRecorder(saes, {layer: None for layer in saes})
    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    with hooked(lm.model, hooks_for([rec], lm.n_layers)), batch_context(batch["attention_mask"]):
        lm.model(**batch, logits_to_keep=1, use_cache=False)
    return {layer: (recs[0][0] > 0).sum(dim=0) for layer, recs in rec.records.items()}


@torch.inference_mode()
def reference_token_counts(lm: LoadedModel, saes: Mapping[int, Sae], prompt: str) -> dict[int, torch.Tensor]:
    """The plain form of ``token_counts``: capture resid_post, encode it one position at a time, count."""
    captured: dict[int, torch.Tensor] = {}

    def grab(layer):
        def edit(h):
            captured[layer] = h[0].detach().float().clone()
        return edit

    batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
    with hooked(lm.model, [Hook("resid_post", layer, grab(layer)) for layer in saes]):
        lm.model(**batch, use_cache=False)
    out = {}
    for layer, sae in saes.items():
        counts = torch.zeros(sae.width, dtype=torch.long)
        enc = encoder_on(sae, captured[layer].device)  # one layer's encoder at a time for a host-held SAE
        for t in range(captured[layer].shape[0]):
            counts += (enc.encode(captured[layer][t]) > 0).long().cpu()
        out[layer] = counts
    return out


def active_on_at_least(counts: Mapping[int, torch.Tensor], k: int) -> list[Feature]:
    """The O'Brien et al. set: features active on at least ``k`` prompt tokens, sorted."""
    return sorted(Feature(layer, int(i)) for layer, c in counts.items() for i in torch.nonzero(c >= k).flatten())


def stage_layers(finished: FinishedRun) -> list[int]:
    """The SAE layers the run's stages used (its --layers, at or above --min-layer, among its SAE layers)."""
    have = sorted(finished.store.read_json("saes.json")["layers"])
    spec = finished.config.get("layers")
    # 4096: above any model's depth; the run itself already checked the spec against its model
    wanted = set(parse_layers(spec, 4096)) if spec else set(have)
    layers = [x for x in have if x in wanted and x >= int(finished.config.get("min_layer", 0))]
    if not layers:
        raise RefusalScopeError(f"the run's SAE layers {have} hold none of its stage layers")
    return layers


# ---- one prompt ---------------------------------------------------------------------------------------------------

def prompt_flow(ctx, prompt_id: int, prompt: str, stage2: Sequence[Feature], randoms: Sequence[Sequence[Feature]],
                k_values: Sequence[int], layers: Sequence[int]):
    """The prompt's Stage-2 set, its random controls and the O'Brien set at every k (features active on ≥ k tokens
    at ``layers``), judged as one request: a flow (``StageContext.lockstep``), so several prompts' completions
    share generation batches. Returns the prompt's result record."""
    wanted = set(layers)
    counts = token_counts(ctx.lm, {layer: s for layer, s in ctx.saes.items() if layer in wanted}, prompt)
    randoms = [list(r) for r in randoms]
    obrien = [active_on_at_least(counts, k) for k in k_values]
    sets = ([list(stage2)] if stage2 else []) + randoms + obrien  # one request: distinct sets are generated once
    judged = yield [(prompt, x) for x in sets]
    j_stage2 = judged[0] if stage2 else None
    j_random = judged[len(sets) - len(obrien) - len(randoms):len(sets) - len(obrien)]
    j_obrien = judged[len(sets) - len(obrien):]
    return {
        "id": prompt_id,
        "stage2": {"size": len(stage2), **(j_stage2.as_dict() if j_stage2 else {"jailbroken": False})},
        "random": [{"features": feature_strings(s), **r.as_dict()} for s, r in zip(randoms, j_random)],
        "obrien": [{"k": k, "n_features": len(s), **r.as_dict()} for k, s, r in zip(k_values, obrien, j_obrien)],
    }


# ---- the analysis -----------------------------------------------------------------------------------------------

def _tables(results: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rnd, obr = [], []
    for r in results:
        for draw, x in enumerate(r["random"]):
            rnd.append({"id": r["id"], "draw": draw, "size": len(x["features"]), "features": x["features"],
                        "jailbroken": x["jailbroken"], "refused": x["refused"], "degenerate": x["degenerate"],
                        "completion": x["completion"], "stage2_size": r["stage2"]["size"],
                        "stage2_jailbroken": r["stage2"]["jailbroken"]})
        for x in r["obrien"]:
            obr.append({"id": r["id"], "k": x["k"], "n_features": x["n_features"], "jailbroken": x["jailbroken"],
                        "refused": x["refused"], "degenerate": x["degenerate"], "completion": x["completion"]})
    random_cols = ["id", "draw", "size", "features", "jailbroken", "refused", "degenerate", "completion",
                   "stage2_size", "stage2_jailbroken"]
    obrien_cols = ["id", "k", "n_features", "jailbroken", "refused", "degenerate", "completion"]
    random_t, obrien_t = pd.DataFrame(rnd, columns=random_cols), pd.DataFrame(obr, columns=obrien_cols)
    asr = (obrien_t.groupby("k")
           .agg(n=("id", "count"), asr=("jailbroken", "mean"), mean_features=("n_features", "mean")).reset_index())
    asr["n"] = asr["n"].astype(int)
    return random_t, obrien_t, asr


def plot_obrien(asr: pd.DataFrame, stage2_asr: float, random_asr: float | None, judge: str):
    """ASR vs k of the O'Brien et al. baseline (paper, Fig. 6), with the Stage-2 and random-control ASR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(asr.k, asr.asr, marker="o", color="tab:blue", label="O'Brien et al.: active on ≥ k tokens")
    ax.axhline(stage2_asr, color="tab:red", ls="--", lw=1.2, label="Stage 2 sets")
    if random_asr is not None:
        ax.axhline(random_asr, color="grey", ls=":", lw=1.5, label="random active, same size")
    ax.set_xlabel("k (prompt tokens a feature is active on)")
    ax.set_ylabel(f"ASR ({judge})")
    ax.set_ylim(-0.02, 1.02)
    twin = ax.twinx()
    twin.plot(asr.k, asr.mean_features, color="black", lw=0.8, alpha=0.6, marker=".", label="mean features ablated")
    twin.set_ylabel("mean features ablated")
    twin.set_yscale("symlog")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], frameon=False, fontsize=7, loc="best")
    ax.set_title("O'Brien et al. baseline vs Stage 2")
    fig.tight_layout()
    return fig


def run(finished: FinishedRun, settings, progress: bool = True) -> dict:
    k_values = sorted(set(settings.k_values))
    if not k_values or k_values[0] < 1:
        raise RefusalScopeError(f"--k-values must be positive integers, got {settings.k_values}")
    if settings.judge:
        check_judge_name(settings.judge)
    records = finished.records[:settings.limit] if settings.limit else finished.records
    if not records:
        raise RefusalScopeError(f"{finished.store.root} holds no finished prompts")
    layers = stage_layers(finished)
    # the Stage-2 and random sets may name layers the context must load too (they are normally stage layers)
    extra = {f.layer for rec in records for f in finished.stage2_set(rec)}
    extra |= {f.layer for rec in records if rec.controls for c in rec.controls.random for f in c.features}
    from refusalscope.pipeline.steps import groups

    group = finished.prompt_batch(settings.prompt_batch)
    ctx = finished.context(device=settings.device, dtype=settings.dtype, judge=settings.judge,
                           max_new_tokens=settings.max_new_tokens,
                           batch_size=finished.batch_size(explicit(settings, "batch_size"), group),
                           layers=sorted(set(layers) | extra))
    judge = ctx.judge.name
    key = digest({"k_values": k_values, "layers": layers, "judge": judge, **ctx.generation_settings})
    done: dict[int, dict] = {}
    todo = []
    for rec in records:
        randoms = [c.features for c in rec.controls.random] if rec.controls is not None else []
        mine = digest([key, rec.prompt, finished.stage2_set(rec), randoms])  # a resumed pipeline may change them
        name = f"{OUT}/prompts/{rec.id:05d}.json"
        old = finished.store.read_json(name) if finished.store.exists(name) else None
        if old is not None and old.get("key") == mine:
            done[rec.id] = old
        else:
            todo.append((rec, randoms, mine, name))
    with tqdm(total=len(records), initial=len(done), desc="controls", unit="prompt", disable=not progress,
              dynamic_ncols=True) as bar:
        # a group's completions share generation batches; each prompt's file is written as its group ends
        for part in groups(todo, group):
            flows = [prompt_flow(ctx, rec.id, rec.prompt, finished.stage2_set(rec), randoms, k_values, layers)
                     for rec, randoms, _, _ in part]
            for (rec, _, mine, name), res in zip(part, ctx.lockstep(flows)):
                res = {"key": mine, **res}
                finished.store.write_json(name, res)
                done[rec.id] = res
            bar.update(len(part))
    results = [done[rec.id] for rec in records]

    random_t, obrien_t, asr = _tables(results)
    finished.store.write_table(f"{OUT}/random.parquet", random_t)
    finished.store.write_table(f"{OUT}/obrien.parquet", obrien_t)
    finished.store.write_table(f"{OUT}/obrien_asr.parquet", asr)
    n2 = sum(r["stage2"]["jailbroken"] for r in results)
    # our choice: Stage-2 ASR over every analysed prompt (no Stage-2 set counts as not jailbroken), as for k
    stage2 = {"n": len(results), "jailbroken": int(n2), "asr": n2 / len(results)}
    rand = {"n": int(len(random_t)), "jailbroken": int(random_t.jailbroken.sum()),
            "asr": float(random_t.jailbroken.mean()) if len(random_t) else None}
    best = asr.loc[asr.asr.idxmax()]
    obrien = {"max_asr": float(best.asr), "k_at_max": int(best.k), "mean_features_at_max": float(best.mean_features),
              "asr_by_k": {str(int(k)): float(a) for k, a in zip(asr.k, asr.asr)},
              "mean_features_by_k": {str(int(k)): float(m) for k, m in zip(asr.k, asr.mean_features)}}
    finished.store.save_figure(f"{OUT}/obrien.png", plot_obrien(asr, stage2["asr"], rand["asr"], judge))
    return {"judge": judge, "n_prompts": len(results), "layers": layers, "stage2": stage2, "random": rand,
            "obrien": obrien, "paper_max_asr": PAPER_MAX_ASR}


def summary_lines(summary: dict) -> list[str]:
    judge, s2, rnd, ob = summary["judge"], summary["stage2"], summary["random"], summary["obrien"]
    paper = ", ".join(f"{v:.2f} {k}" for k, v in summary["paper_max_asr"].items())
    lines = [f"controls on {summary['n_prompts']} prompts, judge {judge}:",
             f"  Stage-2 sets: ASR {s2['asr']:.2f} ({s2['jailbroken']}/{s2['n']})"]
    if rnd["n"]:
        lines.append(f"  equal-size random active features: ASR {rnd['asr']:.2f} ({rnd['jailbroken']}/{rnd['n']})")
    else:
        lines.append("  equal-size random active features: none in the run (run it with --n-random ≥ 1)")
    lines += [f"  O'Brien et al. (features active on ≥ k prompt tokens, layers {summary['layers']}): max ASR "
              f"{ob['max_asr']:.2f} at k = {ob['k_at_max']} ({ob['mean_features_at_max']:.0f} features on average); "
              f"paper: {paper}",
              "  ASR by k: " + ", ".join(f"{k}: {a:.2f}" for k, a in ob["asr_by_k"].items()),
              f"  → {OUT}/ (random.parquet, obrien.parquet, obrien_asr.parquet, obrien.png)"]
    return lines
