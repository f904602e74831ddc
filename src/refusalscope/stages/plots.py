"""Figures for Stages 1–3: what a reader of the run directory would rather look at than read."""

from __future__ import annotations

from collections import Counter

import pandas as pd


def layer_counts(features: pd.Series) -> Counter:
    """Features per layer over many sets; ``features`` holds lists of "L{layer}/{index}" strings."""
    from refusalscope.saes.features import Feature

    return Counter(Feature.parse(f).layer for fs in features for f in fs)


def plot_stages(s1: pd.DataFrame, s2: pd.DataFrame, best_tau: float, n_random_jailbroken: int, n_random: int):
    """Left: prompts jailbroken per τ by the intersected Stage-2 sets (the paper's Table 1), with the mean set
    size and the random equal-size control. Right: the layers of the best-τ sets' features (Stage-1 sets are
    uniform over layers by construction: top-K per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    per_tau = s2.groupby("tau").agg(jailbroken=("jailbroken", "sum"), size=("size", "mean"), n=("id", "count"))
    n = int(per_tau.n.max()) if len(per_tau) else 0
    ax.bar(per_tau.index, per_tau.jailbroken, width=0.06, color="tab:red", label="Stage 2 (intersection)")
    if n_random:
        ax.axhline(n_random_jailbroken, color="grey", ls="--", lw=1, label="random, same size")
    if len(s1):
        ax.axhline(int(s1.jailbroken.sum()), color="tab:orange", ls=":", lw=1.5, label="Stage 1")
    ax.set_xlabel("τ")
    ax.set_ylabel(f"prompts jailbroken (of {n})")
    ax.set_ylim(0, max(n, 1) * 1.08)  # room for the Stage-1 line at n
    ax.legend(frameon=False, fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.9))  # below the Stage-1 line
    twin = ax.twinx()
    twin.plot(per_tau.index, per_tau["size"], color="black", marker="o", ms=3, lw=1, label="mean set size")
    twin.legend(frameon=False, fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.45))
    twin.set_ylabel("mean set size")
    ax.set_title("Stage 2 per τ")
    best = s2[s2.tau == best_tau]
    counts = layer_counts(best.features)
    layers = sorted(counts)
    bx.bar(layers, [counts[layer] for layer in layers], color="tab:red")
    bx.set_xlabel("layer")
    bx.set_ylabel("features (all prompts)")
    bx.set_title(f"Layers of the Stage-2 features, τ = {best_tau:g}")
    fig.tight_layout()
    return fig


def plot_stage3(table: pd.DataFrame, n_prompts: int):
    """Prompts jailbroken at each K by the FM ranking and by the probe ranking (paper, Stage 3 vs the linear
    baseline), and the share of prompts whose smallest jailbreaking FM K is ≤ K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method, style in (("fm", "o-"), ("probe", "s--")):
        rows = table[table.method == method].groupby("k")
        # the FM sweep stops at a prompt's first jailbreaking batch: plot only the K every prompt was judged at
        full = rows.id.nunique()
        sub = rows.jailbroken.sum()[full == full.max()] if len(full) else full
        if len(sub):
            ax.plot(sub.index, sub.values, style, label=f"{method.upper()}: jailbroken at K (all prompts judged)")
    best = table[table.method == "fm"].groupby("id").apply(
        lambda g: g[g.jailbroken.astype(bool)].k.min(), include_groups=False).dropna()
    if len(best):
        ks = sorted(table[table.method == "fm"].k.unique())
        ax.step(ks, [int((best <= k).sum()) for k in ks], where="post", color="grey",
                label="FM: smallest jailbreaking K ≤ K")
    ax.set_xlabel("K (new features ablated with the active Stage-2 set)")
    ax.set_ylabel(f"prompts jailbroken (of {n_prompts})")
    ax.set_ylim(0, max(n_prompts, 1) + 0.5)
    ax.legend(fontsize=8)
    ax.set_title("Stage 3: FM vs linear probe")
    fig.tight_layout()
    return fig
