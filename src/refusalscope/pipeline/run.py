"""``refusalscope run``: every missing step of a run, then Stages 1–2 prompt by prompt, resumably.

Layout of the run directory (all tables load with pandas):
- run.json, direction.*, saes.json (+ sae_eval.parquet when trained): the earlier steps;
- baseline.parquet: every prompt's unablated completion and verdict (computed once);
- prompts/<id>.json: one file per finished prompt, written atomically: a rerun skips these;
- stage1.parquet, stage2.parquet (one row per prompt × τ), stage2_chains.parquet (Δ traces), controls.parquet,
  stages.png (jailbreaks per τ, features per layer), summary.json: rebuilt from the per-prompt files at the end of
  every run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from refusalscope import __version__
from refusalscope.config import DirectionSettings, RunSettings, SaeTrainSettings, parse_layers
from refusalscope.data import check_disjoint, drop_overlap, load_prompts
from refusalscope.direction import load_direction, run_direction
from refusalscope.errors import RefusalScopeError
from refusalscope.asr import seen_prompts
from refusalscope.saes.features import Feature, active_features, as_latent_set, refusal_probs
from refusalscope.lm.inference import generate
from refusalscope.judges import Judge, make_judge
from refusalscope.interventions.latents import LatentAblation
from refusalscope.lm.loading import LoadedModel, load_model
from refusalscope.saes.sae import Sae
from refusalscope.saes.run_set import load_run_saes, record_sae_set, run_sae_train
from refusalscope.saes.registry import DEFAULT_SAE_SET, load_sae_set
from refusalscope.stages.stage1 import ranked_latents, run_stage1
from refusalscope.stages.stage2 import intersect, prune_batched
from refusalscope.stages.plots import plot_stages
from refusalscope.store import RunStore

log = logging.getLogger("refusalscope")


def init_run(store: RunStore, s, lm: LoadedModel) -> dict:
    """Write run.json for a new run; for an existing one, check it was made with the same model."""
    if store.exists("run.json"):
        run = store.read_json("run.json")
        if run.get("model") != s.model:
            raise RefusalScopeError(f"{store.root} was made with model {run.get('model')!r}, not {s.model!r}; "
                                    "use another --out")
        return run
    run = {"model": s.model, "source": lm.source, "device": s.device, "dtype": s.dtype,
           "chat_template": s.chat_template, "data_dir": s.data_dir, "refusal_tokens": list(lm.refusal_tokens),
           "refusalscope": __version__}
    store.write_json("run.json", run)
    return run


def ensure_direction(lm: LoadedModel, s: RunSettings, store: RunStore) -> None:
    if store.exists("direction.json"):
        return
    log.warning("no refusal direction in %s yet: computing it (refusalscope direction)", store.root)
    ds = DirectionSettings(model=s.model, out=s.out, data_dir=s.data_dir, device=s.device, dtype=s.dtype,
                           batch_size=s.batch_size, chat_template=s.chat_template, max_new_tokens=s.max_new_tokens)
    store.write_json("config.direction.json", ds.model_dump(mode="json"))
    summary = run_direction(lm, ds, store)
    if summary.get("note"):
        log.warning("direction: %s", summary["note"])


def ensure_saes(lm: LoadedModel, s: RunSettings, store: RunStore) -> None:
    if store.exists("saes.json"):
        return
    entry_alias = lm.entry.alias if lm.entry else None
    spec = s.saes or DEFAULT_SAE_SET.get(entry_alias or "")
    if spec:
        layers = parse_layers(s.layers, lm.n_layers) if s.layers else None
        saes = load_sae_set(spec, layers)
        record_sae_set(store, spec, sorted(saes), {"kind": "loaded"})
        return
    log.warning("no SAEs known for %s: training them (refusalscope sae train)", s.model)
    ts = SaeTrainSettings(run=s.out, data_dir=s.data_dir, device=s.device, dtype=s.dtype, batch_size=s.batch_size)
    store.write_json("config.sae_train.json", ts.model_dump(mode="json"))
    run_sae_train(lm, ts, store, s.data_dir)


def stage_layers(saes: Mapping[int, Sae], s: RunSettings, n_layers: int) -> list[int]:
    wanted = parse_layers(s.layers, n_layers) if s.layers else sorted(saes)
    layers = [l for l in wanted if l >= s.min_layer and l in saes]
    if not layers:
        raise RefusalScopeError(f"no SAE layer ≥ {s.min_layer} among {sorted(saes)}; check --layers/--min-layer")
    return layers


def baseline(lm: LoadedModel, prompts: Sequence[str], judge: Judge, s: RunSettings, store: RunStore) -> pd.DataFrame:
    if store.exists("baseline.parquet"):
        table = store.read_table("baseline.parquet")
        if list(table.prompt) == list(prompts):
            return table
        log.warning("the prompt list changed since baseline.parquet was written: recomputing the baseline")
    outs = generate(lm, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, desc="baseline")
    verdicts = judge.judge(prompts, outs)
    table = pd.DataFrame({"id": range(len(prompts)), "prompt": list(prompts), "completion": outs,
                          "refused": [v.refused for v in verdicts], "jailbroken": [v.jailbroken for v in verdicts],
                          "degenerate": [v.degenerate for v in verdicts]})
    store.write_table("baseline.parquet", table)
    return table


def _judge_sets(lm, prompt, saes, sets: Sequence[Sequence[Feature]], judge, s) -> list[dict]:
    """Ablate each set, generate, judge; identical sets are generated once."""
    keys = [tuple(sorted(x)) for x in sets]
    uniq = list(dict.fromkeys(keys))
    if not uniq:
        return []
    outs = generate(lm, [prompt] * len(uniq), max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                    interventions=[LatentAblation.build(saes, [as_latent_set(u) for u in uniq])], progress=False)
    verdicts = judge.judge([prompt] * len(uniq), outs)
    res = {u: {"completion": o, "jailbroken": v.jailbroken, "refused": v.refused, "degenerate": v.degenerate}
           for u, o, v in zip(uniq, outs, verdicts)}
    return [res[k] for k in keys]


STAGE_KEYS = ("stages", "layers", "min_layer", "k_step", "k_cap", "block", "tau", "seeds", "n_random",
              "max_new_tokens", "judge", "seed", "refusal_tokens")


def stage_key(s: RunSettings) -> dict:
    """The options a finished prompt's results depend on: a rerun with other values recomputes the prompt."""
    return {k: v for k, v in s.model_dump(mode="json").items() if k in STAGE_KEYS and v is not None}


def process_prompt(lm, pid: int, prompt: str, saes, ranked, judge, s: RunSettings) -> dict:
    t0 = time.perf_counter()
    rec: dict = {"id": pid, "prompt": prompt, "settings": stage_key(s)}
    r1 = run_stage1(lm, prompt, saes, ranked, judge, step=s.k_step, cap=s.k_cap, chunk=s.k_chunk,
                    max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
    rec["stage1"] = {"k": r1.k, "features": r1.features, "size": len(r1.features), "completion": r1.completion,
                     "jailbroken": r1.jailbroken, "refused": r1.refused, "degenerate": r1.degenerate,
                     "tried": r1.tried, "seconds": round(time.perf_counter() - t0, 2)}
    if "2" not in s.stages:
        return rec
    if not r1.jailbroken:
        rec["stage2"] = {"skipped": "stage 1 found no jailbreaking set up to the K cap"}
        return rec
    t1 = time.perf_counter()
    cands = r1.features

    stage2_batch = s.stage2_batch_size or (1024 if torch.device(lm.device).type == "cuda" else 64)

    def prob(member):
        return refusal_probs(lm, prompt, saes, [], candidates=cands, member=member, batch_size=stage2_batch)

    kept, chains = prune_batched(cands, prob, s.tau, s.seeds, s.block)
    per_tau = [{"tau": t, "seed_sizes": [len(kept[(t, sd)]) for sd in s.seeds],
                "features": intersect([kept[(t, sd)] for sd in s.seeds])} for t in s.tau]
    for row, v in zip(per_tau, _judge_sets(lm, prompt, saes, [r["features"] for r in per_tau], judge, s)):
        row.update(v, size=len(row["features"]))
    t2 = time.perf_counter()
    # the set the sanity checks use: the smallest jailbreaking set (else the largest set)
    winners = [r for r in per_tau if r["jailbroken"] and r["features"]]
    chosen = min(winners, key=lambda r: (r["size"], -r["tau"])) if winners else max(per_tau, key=lambda r: r["size"])
    checks: dict = {"tau": chosen["tau"], "size": chosen["size"], "jailbroken": chosen["jailbroken"]}
    feats = chosen["features"]
    if feats:
        acts = active_features(lm, prompt, saes, feats)
        inactive = [f for f in feats if acts[f] <= 0]
        checks.update(n_inactive=len(inactive), inactive=inactive)
        control_sets: list[list[Feature]] = []
        if inactive and len(inactive) < len(feats):
            control_sets.append([f for f in feats if f not in inactive])
        active_pool = sorted(active_features(lm, prompt, saes))
        rng = random.Random(s.seed * 1_000_003 + pid)
        randoms = [sorted(rng.sample(active_pool, min(len(feats), len(active_pool)))) for _ in range(s.n_random)]
        results = _judge_sets(lm, prompt, saes, control_sets + randoms, judge, s)
        if control_sets:
            checks["without_inactive"] = results[0]
        checks["random"] = [{"features": f, **r} for f, r in zip(randoms, results[len(control_sets):])]
    rec["stage2"] = {"candidates": len(cands), "per_tau": per_tau, "checks": checks,
                     "chains": [{"seed": c.seed, "blocks": c.blocks, "probs": c.probs, "deltas": c.deltas}
                                for c in chains],
                     "seconds": {"prune": round(t2 - t1, 2), "total": round(time.perf_counter() - t1, 2)}}
    return rec


def _feature_str(fs) -> list[str]:
    return [f"L{l}/{i}" for l, i in fs]


def aggregate(store: RunStore, records: list[dict], n_prompts: int, n_refused: int, s: RunSettings) -> dict:
    s1 = pd.DataFrame([{"id": r["id"], "prompt": r["prompt"], "k": r["stage1"]["k"], "size": r["stage1"]["size"],
                        "jailbroken": r["stage1"]["jailbroken"], "degenerate": r["stage1"]["degenerate"],
                        "features": _feature_str(r["stage1"]["features"]), "completion": r["stage1"]["completion"]}
                       for r in records])
    store.write_table("stage1.parquet", s1)
    summary: dict = {"n_prompts": n_prompts, "n_refused_baseline": n_refused, "n_processed": len(records),
                     "stage1": {"jailbroken": int(s1.jailbroken.sum()) if len(s1) else 0,
                                "mean_k": float(s1.k.dropna().mean()) if len(s1) and s1.k.notna().any() else None,
                                "mean_size": float(s1["size"].mean()) if len(s1) else None}}
    if "2" in s.stages:
        rows, chains, controls = [], [], []
        for r in records:
            st = r.get("stage2", {})
            for t in st.get("per_tau", []):
                rows.append({"id": r["id"], "tau": t["tau"], "size": t["size"], "seed_sizes": t["seed_sizes"],
                             "jailbroken": t["jailbroken"], "degenerate": t["degenerate"],
                             "features": _feature_str(t["features"]), "completion": t["completion"]})
            for c in st.get("chains", []):
                for step, (V, d) in enumerate(zip(c["blocks"], c["deltas"])):
                    chains.append({"id": r["id"], "seed": c["seed"], "step": step, "block": _feature_str(V),
                                   "p_before": c["probs"][step], "p_after": c["probs"][step + 1], "delta": d})
            ch = st.get("checks", {})
            for x in ch.get("random", []):
                controls.append({"id": r["id"], "kind": "random", "size": len(x["features"]),
                                 "jailbroken": x["jailbroken"], "completion": x["completion"]})
            if "without_inactive" in ch:
                controls.append({"id": r["id"], "kind": "without_inactive", "size": ch["size"] - ch["n_inactive"],
                                 "jailbroken": ch["without_inactive"]["jailbroken"],
                                 "completion": ch["without_inactive"]["completion"]})
        s2 = pd.DataFrame(rows, columns=["id", "tau", "size", "seed_sizes", "jailbroken", "degenerate", "features",
                                         "completion"])
        ctrl = pd.DataFrame(controls, columns=["id", "kind", "size", "jailbroken", "completion"])
        store.write_table("stage2.parquet", s2)
        store.write_table("stage2_chains.parquet", pd.DataFrame(chains))
        store.write_table("controls.parquet", ctrl)
        per_tau = {}
        for t in s.tau:
            sub = s2[s2.tau == t]
            per_tau[f"{t:g}"] = {"jailbroken": int(sub.jailbroken.sum()), "n": int(len(sub)),
                                 "mean_size": float(sub["size"].mean()) if len(sub) else None}
        best = max(s.tau, key=lambda t: (per_tau[f"{t:g}"]["jailbroken"], -(per_tau[f"{t:g}"]["mean_size"] or 0)))
        rnd = ctrl[ctrl.kind == "random"]
        wo = ctrl[ctrl.kind == "without_inactive"]
        checks = [r["stage2"]["checks"] for r in records if r.get("stage2", {}).get("checks", {}).get("size")]
        summary["stage2"] = {"best_tau": best, "jailbroken": per_tau[f"{best:g}"]["jailbroken"],
                             "mean_size": per_tau[f"{best:g}"]["mean_size"], "per_tau": per_tau}
        summary["random_control"] = {"jailbroken": int(rnd.jailbroken.sum()), "n": int(len(rnd))}
        summary["inactive_features"] = {
            "prompts_with_inactive": sum(1 for c in checks if c.get("n_inactive")),
            "inactive": sum(c.get("n_inactive", 0) for c in checks), "features": sum(c["size"] for c in checks),
            "jailbreak_fails_without_them": int((~wo.jailbroken.astype(bool)).sum()) if len(wo) else 0,
            "n_tested": int(len(wo))}
        if len(s2):
            store.save_figure("stages.png", plot_stages(s1, s2, best, int(rnd.jailbroken.sum()), int(len(rnd))))
    store.write_json("summary.json", summary)
    return summary


def run_pipeline(s: RunSettings, progress: bool = True) -> dict:
    store = RunStore(s.out)
    lm = load_model(s.model, device=s.device, dtype=s.dtype, chat_template=s.chat_template,
                    refusal_tokens=tuple(s.refusal_tokens) if s.refusal_tokens else None)
    run = init_run(store, s, lm)
    data_dir = s.data_dir or run.get("data_dir")
    store.write_json("config.run.json", s.model_dump(mode="json"))
    ensure_direction(lm, s, store)
    ensure_saes(lm, s, store)
    all_saes = load_run_saes(store, lm)
    layers = stage_layers(all_saes, s, lm.n_layers)
    saes = {l: all_saes[l].to(lm.device, torch.float32) for l in layers}
    direction, _ = load_direction(store)

    prompts = load_prompts(s.prompts, data_dir=data_dir, column=s.column)
    seen = seen_prompts(store)
    if s.overlap == "error":
        check_disjoint(seen, prompts.texts, what="stage")
    elif s.overlap == "drop":
        prompts, _ = drop_overlap(seen, prompts)
    prompts = prompts.head(s.limit)
    if len(prompts) == 0:
        raise RefusalScopeError("no prompts left (all were used to train the direction or SAEs)")
    judge = make_judge(s.judge)
    base = baseline(lm, prompts.texts, judge, s, store)
    refused = base[base.refused.astype(bool)]
    if s.max_refused:
        refused = refused.head(s.max_refused)
    ranked = ranked_latents(saes, direction, s.k_cap)
    store.write_json("stage1_ranking.json", {str(l): ids for l, ids in ranked.items()})

    records = []
    todo = []
    for pid, prompt in zip(refused.id, refused.prompt):
        name = f"prompts/{int(pid):05d}.json"
        if store.exists(name):
            rec = store.read_json(name)
            if rec.get("prompt") == prompt and rec.get("settings") == stage_key(s):
                records.append(rec)
                continue
        todo.append((int(pid), prompt))
    with tqdm(total=len(refused), initial=len(records), desc="stages " + ",".join(s.stages), unit="prompt",
              disable=not progress, dynamic_ncols=True) as bar:
        for pid, prompt in todo:
            rec = process_prompt(lm, pid, prompt, saes, ranked, judge, s)
            store.write_json(f"prompts/{pid:05d}.json", rec)
            records.append(rec)
            bar.update(1)
    records.sort(key=lambda r: r["id"])
    return aggregate(store, records, len(prompts), int(len(base[base.refused.astype(bool)])), s)
