"""The refusal direction (Arditi et al. 2024; the paper's appendix "Deriving a Refusal Steering Vector").

1. Difference of means of resid_pre activations, harmful minus harmless, at the post-instruction positions of every
   layer, on training prompts (``mean_difference``).
2. Each candidate (layer, position) is scored by the refusal log-odds on held-out harmful prompts when its unit
   direction is projected out of every layer (lower is better). refusal_direction's filters are available:
   ``kl`` (ablation barely changes harmless next-token distributions), ``steer`` (adding the direction makes
   harmless prompts refuse), ``prune`` (drop the last 20% of layers). If no candidate passes, selection falls back
   to all candidates and says so.
3. The best-scoring few are ranked by held-out attack success rate under ablation; the best is l*.
Steps 1 and 2 run the chat template's prefix once per batch (``share_prefix``, ``lm.shared_prefix``; our choice: on,
since every row's ablation is the same and the values move by float rounding only); step 3 generates plainly.
Per-layer cosine similarity of harmful and harmless activations with r̂(l*) (the paper's Figs. 4/5) is saved as a
table and a plot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope.interventions.projection import cosine, unit
from refusalscope.config import DirectionSettings, parse_layers
from refusalscope.data import check_disjoint, load_prompts
from refusalscope.errors import RefusalScopeError
from refusalscope.lm.inference import collect_residuals, generate, map_last_logits
from refusalscope.interventions import ActivationAddition, DirectionAblation
from refusalscope.judges import Combined, SubstringJudge, refusal_log_odds, summarize
from refusalscope.lm.loading import LoadedModel
from refusalscope.lm.prompts import post_instruction_positions
from refusalscope.store import RunStore

log = logging.getLogger(__name__)


# ---- pure math -------------------------------------------------------------------------------------------------

def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """(N, L, P, d) activations of each side -> (P, L, d) mean(harmful) - mean(harmless)."""
    return (harmful.mean(0) - harmless.mean(0)).permute(1, 0, 2).contiguous()


def kl_divergence(base_logprobs: torch.Tensor, new_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || new) per row, from log-probabilities (N, V) -> (N,)."""
    return (base_logprobs.exp() * (base_logprobs - new_logprobs)).sum(-1)


def cosine_table(harmful: torch.Tensor, harmless: torch.Tensor, direction: torch.Tensor) -> pd.DataFrame:
    """Per-layer cosine of (N, L, d) last-position activations with one direction; mean and std per group."""
    rows = []
    for group, acts in (("harmful", harmful), ("harmless", harmless)):
        cos = cosine(acts, direction)  # (N, L)
        for layer in range(cos.shape[1]):
            rows.append({"layer": layer, "group": group, "mean_cos": float(cos[:, layer].mean()),
                         "std_cos": float(cos[:, layer].std()) if cos.shape[0] > 1 else 0.0})
    return pd.DataFrame(rows)


def plot_cosines(table: pd.DataFrame, layer_star: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for group, colour in (("harmful", "tab:red"), ("harmless", "tab:blue")):
        t = table[table.group == group]
        ax.plot(t.layer, t.mean_cos, marker="o", ms=3, color=colour, label=group)
        ax.fill_between(t.layer, t.mean_cos - t.std_cos, t.mean_cos + t.std_cos, color=colour, alpha=0.2)
    ax.axvline(layer_star, color="grey", ls="--", lw=1, label=f"l* = {layer_star}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer (resid_pre)")
    ax.set_ylabel("cos(activation, r̂(l*))")
    ax.set_title(title)
    ax.legend(frameon=False)
    return fig


# ---- model-facing steps ----------------------------------------------------------------------------------------

@dataclass
class DirectionResult:
    layer: int
    position: int
    direction: torch.Tensor  # raw mean difference at (layer, position); its norm is the steering λ
    mean_diffs: torch.Tensor  # (P, L, d)
    positions: list[int]
    candidates: pd.DataFrame
    cosines: pd.DataFrame
    note: str

    @property
    def unit(self) -> torch.Tensor:
        return unit(self.direction)


def _mean_log_odds(lm, prompts, interventions, settings) -> torch.Tensor:
    ids = lm.refusal_token_ids()
    return map_last_logits(lm, prompts, lambda x: refusal_log_odds(torch.log_softmax(x, -1), ids),
                           interventions=interventions, batch_size=settings.batch_size, progress=False,
                           share_prefix=settings.share_prefix)


def score_candidates(lm: LoadedModel, mean_diffs: torch.Tensor, positions: list[int], layers: list[int],
                     harmful_val: list[str], harmless_val: list[str], settings: DirectionSettings) -> pd.DataFrame:
    """One row per (layer, position): ablation refusal score and, when asked, the KL and steer filter values."""
    filters = set(settings.filters)
    base_lp = None
    if "kl" in filters:
        base_lp = map_last_logits(lm, harmless_val, lambda x: torch.log_softmax(x, -1),
                                  batch_size=settings.batch_size, progress=False, share_prefix=settings.share_prefix)
    prune_from = int(lm.n_layers * (1 - settings.prune_fraction))
    rows = []
    cands = [(p_idx, layer) for layer in layers for p_idx in range(len(positions))]
    for p_idx, layer in tqdm(cands, desc="score candidate directions", unit="cand", dynamic_ncols=True):
        r = mean_diffs[p_idx, layer]
        row = {"layer": layer, "position": positions[p_idx], "norm": float(r.norm())}
        if float(r.norm()) == 0:
            rows.append({**row, "ablation_score": float("nan"), "passes": False})
            continue
        ablate = [DirectionAblation(r)]
        row["ablation_score"] = float(_mean_log_odds(lm, harmful_val, ablate, settings).mean())
        passes = True
        if "kl" in filters:
            new_lp = map_last_logits(lm, harmless_val, lambda x: torch.log_softmax(x, -1), interventions=ablate,
                                     batch_size=settings.batch_size, progress=False,
                                     share_prefix=settings.share_prefix)
            row["kl"] = float(kl_divergence(base_lp, new_lp).mean())
            passes &= row["kl"] <= settings.kl_threshold
        if "steer" in filters:
            add = [ActivationAddition(r, layer, coeff=float(r.norm()))]
            row["steer_score"] = float(_mean_log_odds(lm, harmless_val, add, settings).mean())
            passes &= row["steer_score"] >= settings.steer_threshold
        if "prune" in filters:
            passes &= layer < prune_from
        row["passes"] = bool(passes)
        rows.append(row)
    return pd.DataFrame(rows)


def select(lm: LoadedModel, table: pd.DataFrame, mean_diffs: torch.Tensor, positions: list[int],
           harmful_val: list[str], settings: DirectionSettings) -> tuple[pd.DataFrame, str]:
    """Held-out ASR of the best-scoring candidates; returns the table with ``asr``/``selected`` and a note."""
    table = table.copy()
    pool = table[table.passes & table.ablation_score.notna()]
    note = ""
    if settings.filters and pool.empty:
        note = (f"no candidate passed the filters {settings.filters}; falling back to all candidates "
                "(ranked by ablation refusal score)")
        log.warning(note)
        pool = table[table.ablation_score.notna()]
    if pool.empty:
        raise RefusalScopeError("no usable candidate direction (all mean differences are zero)")
    top = pool.nsmallest(settings.asr_candidates, "ablation_score")
    judge = Combined(SubstringJudge())
    table["asr"] = float("nan")
    table["degenerate_rate"] = float("nan")
    for idx in tqdm(list(top.index), desc="held-out ASR of top candidates", unit="cand", dynamic_ncols=True):
        row = table.loc[idx]
        r = mean_diffs[positions.index(int(row.position)), int(row.layer)]
        completions = generate(lm, harmful_val, max_new_tokens=settings.max_new_tokens,
                               batch_size=settings.batch_size, interventions=[DirectionAblation(r)], progress=False)
        s = summarize(judge.judge(harmful_val, completions))
        table.loc[idx, "asr"] = s["asr"]
        table.loc[idx, "degenerate_rate"] = s["degenerate_rate"]
    ranked = table.loc[top.index].sort_values(["asr", "ablation_score"], ascending=[False, True])
    table["selected"] = False
    table.loc[ranked.index[0], "selected"] = True
    return table, note


def compute_direction(lm: LoadedModel, settings: DirectionSettings) -> tuple[DirectionResult, dict]:
    """Steps 1-3 of the module docstring; returns the result and the prompts it used (for leak checks)."""
    def load(name, n):
        return load_prompts(name, data_dir=settings.data_dir, limit=n)

    harmful_tr, harmless_tr = load(settings.harmful_train, settings.n_train), load(settings.harmless_train,
                                                                                  settings.n_train)
    harmful_va, harmless_va = load(settings.harmful_val, settings.n_val), load(settings.harmless_val, settings.n_val)
    for train, val in ((harmful_tr, harmful_va), (harmless_tr, harmless_va), (harmful_tr, harmless_tr)):
        check_disjoint(train.texts, val.texts, what=f"{val.name}", allow=settings.allow_overlap)
    layers = parse_layers(settings.layers, lm.n_layers)
    positions = post_instruction_positions(lm.tokenizer) if settings.positions == "post-instruction" else [-1]

    harm_acts = collect_residuals(lm, harmful_tr.texts, positions, batch_size=settings.batch_size,
                                  desc="harmful activations", share_prefix=settings.share_prefix)
    safe_acts = collect_residuals(lm, harmless_tr.texts, positions, batch_size=settings.batch_size,
                                  desc="harmless activations", share_prefix=settings.share_prefix)
    mean_diffs = mean_difference(harm_acts, safe_acts)
    table = score_candidates(lm, mean_diffs, positions, layers, harmful_va.texts, harmless_va.texts, settings)
    table, note = select(lm, table, mean_diffs, positions, harmful_va.texts, settings)
    best = table[table.selected].iloc[0]
    layer, position = int(best.layer), int(best.position)
    direction = mean_diffs[positions.index(position), layer].clone()
    last = positions.index(-1) if -1 in positions else len(positions) - 1
    cos = cosine_table(harm_acts[:, :, last], safe_acts[:, :, last], direction)
    result = DirectionResult(layer, position, direction, mean_diffs, positions, table, cos, note)
    used = {"harmful_train": harmful_tr.texts, "harmless_train": harmless_tr.texts,
            "harmful_val": harmful_va.texts, "harmless_val": harmless_va.texts}
    return result, used


def save_direction(store: RunStore, result: DirectionResult, lm: LoadedModel, settings: DirectionSettings,
                   used: dict, seconds: float) -> dict:
    summary = {
        "layer": result.layer, "position": result.position, "norm": float(result.direction.norm()),
        "hook_point": "resid_pre", "positions": result.positions, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "model": settings.model, "filters": list(settings.filters), "note": result.note,
        "selected_asr": float(result.candidates[result.candidates.selected].asr.iloc[0]),
        "seconds": round(seconds, 1),
    }
    store.write_tensors("direction.safetensors", {"direction": result.direction, "mean_diffs": result.mean_diffs},
                        {"layer": result.layer, "position": result.position, "positions": result.positions})
    store.write_table("direction_candidates.parquet", result.candidates)
    store.write_table("cosine_diagnostics.parquet", result.cosines)
    store.save_figure("cosine_diagnostics.png",
                      plot_cosines(result.cosines, result.layer, f"{lm.name}: activations vs refusal direction"))
    store.write_json("prompts_used.json", used)
    store.write_json("direction.json", summary)
    return summary


def load_direction(store: RunStore) -> tuple[torch.Tensor, dict]:
    """(raw direction at l*, summary dict) from a run."""
    tensors, _ = store.read_tensors("direction.safetensors")
    return tensors["direction"], store.read_json("direction.json")


def run_direction(lm: LoadedModel, settings: DirectionSettings, store: RunStore) -> dict:
    t0 = time.time()
    result, used = compute_direction(lm, settings)
    return save_direction(store, result, lm, settings, used, time.time() - t0)
