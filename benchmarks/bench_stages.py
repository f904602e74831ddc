"""Time Stages 1–2 for one prompt, and Stage 2 batched vs the sequential reference.

    # CPU, the default model with a run's cached SAEs and direction (first AdvBench prompt it refuses)
    python benchmarks/bench_stages.py --run runs/default --data-dir ../shared/data
    # GPU, Gemma-2-2B-shaped random weights, 65k JumpReLU SAEs on layers 3..25, ~4,800 Stage-2 candidates
    python benchmarks/bench_stages.py --random-shape gemma-2-2b --device cuda --candidates 4800

Sequential Stage 2 runs for ``--sequential-taus`` × all seeds (the reference's cost grows with each τ), and the
kept sets must be identical to the batched ones. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_common import emit, random_jumprelu_saes, random_model, sync

TAUS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
           "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
           "aten::_efficient_attention_forward")


def profile_stage2(run, device: torch.device, path: str) -> float:
    """``run()`` once under torch.profiler; the table of its costliest operators goes to ``path``. Returns the
    share of the operators' self time (on the device, or the CPU without one) spent in matmuls and attention: what
    compiling, which fuses the rest, cannot shorten."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    with open(path, "w") as f:
        f.write(averages.table(sort_by=key, row_limit=30, max_name_column_width=60) + "\n")
    # operators only (kernels are listed too, with the time their operator is charged: counted once)
    self_time = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) or 0) for e in averages
                 if e.device_type == DeviceType.CPU]
    total = sum(t for _, t in self_time)
    return round(sum(t for k, t in self_time if k in MATMULS) / total, 3) if total else 0.0


def partial(out: dict) -> None:
    """The results so far, as one line on stderr: a run stopped by a time limit still shows what it measured."""
    import sys

    print("partial:", json.dumps(out), file=sys.stderr, flush=True)


def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--nth", type=int, default=0, help="with --run: use the nth AdvBench prompt the model refuses")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--random-shape", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=65536)
    ap.add_argument("--candidates", type=int, default=4800)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--share", default="auto", help="refusal_probs_for_batch's share: auto, positions, layers, none")
    ap.add_argument("--repeats", type=int, default=1, help="batched Stage 2 runs; the best time is reported")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sequential-taus", default="0.1,0.5")
    ap.add_argument("--sequential-seeds", default=None, help="seeds for the reference run (default: --seeds)")
    ap.add_argument("--rows-off", action="store_true", help="also time batched Stage 2 with one row per set "
                    "(SetScorer share_rows=False, the code before shared rows) and check it keeps the same sets")
    ap.add_argument("--skip-inactive", action="store_true", help="also time Stage 2 with the chain steps whose "
                    "block did not fire skipped (stage2.build_chains_skipping) and check it keeps the same sets")
    ap.add_argument("--compile-scoring", default=None, metavar="MODE", help="also time batched Stage 2 with "
                    "compiled decoder layers (SetScorer compile=MODE: inductor or aot_eager; the first run, which "
                    "compiles, timed apart), with shared rows and, with --rows-off, one row per set; check each "
                    "keeps the same sets; with --profile, profile each too (FILE.compiled[_rows_off].txt)")
    ap.add_argument("--profile", default=None, metavar="FILE", help="also run batched Stage 2 once under "
                    "torch.profiler and write its 30 costliest operators (by self time on the device, or the CPU "
                    "without one) to FILE: where Stage 2's time goes")
    return ap


def main() -> None:
    from refusalscope.stages.scoring import SetScorer, batch_scorer
    from refusalscope.stages.stage1 import candidate_set, ranked_latents
    from refusalscope.stages.stage2 import prune_batched, prune_sequential

    args = arg_parser().parse_args()
    device = torch.device(args.device)
    seeds = [int(x) for x in args.seeds.split(",")]
    seq_taus = [float(x) for x in args.sequential_taus.split(",") if x]
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "threads": torch.get_num_threads()}
    t_stage1 = None
    if args.run:
        from refusalscope.data import drop_overlap, load_prompts
        from refusalscope.direction import load_direction
        from refusalscope.asr import seen_prompts
        from refusalscope.judges import make_judge
        from refusalscope.lm.loading import load_model
        from refusalscope.lm.prompts import format_chat, tokenize
        from refusalscope.saes.run_set import load_run_saes
        from refusalscope.stages.stage1 import run_stage1
        from refusalscope.store import RunStore

        store = RunStore(args.run, create=False)
        lm = load_model(store.read_json("run.json")["model"], device=args.device)
        saes = {layer: s.to(lm.device) for layer, s in load_run_saes(store, lm).items() if layer >= 3}
        direction, _ = load_direction(store)
        prompts, _ = drop_overlap(seen_prompts(store), load_prompts("advbench", data_dir=args.data_dir))
        judge = make_judge("substring")
        from refusalscope.lm.inference import generate
        texts = prompts.texts[:60]
        refused = [p for p, v in zip(texts, judge.judge(texts, generate(lm, texts, max_new_tokens=24,
                                                                        progress=False))) if v.refused]
        prompt = refused[args.nth]
        ranked = ranked_latents(saes, direction, 200)
        t0 = time.perf_counter()
        from refusalscope.stages.context import StageContext

        ctx = StageContext(lm, saes, judge, max_new_tokens=48)
        r1 = run_stage1(ctx, prompt, ranked, step=10, cap=200, chunk=5)
        t_stage1 = time.perf_counter() - t0
        cands = r1.features
        out.update(prompt=prompt, stage1_k=r1.k, stage1_jailbroken=r1.jailbroken, stage1_s=round(t_stage1, 2))
        model, n_layers = lm.model, lm.n_layers
        batch = tokenize(lm.tokenizer, format_chat(lm.tokenizer, [prompt]), lm.device)
        token_ids = lm.refusal_token_ids()
    else:
        from refusalscope.lm.loading import contiguous_head_input

        model, n_layers, d, vocab = random_model(args.random_shape, device)
        contiguous_head_input(model)  # as every model refusalscope loads (LoadedModel) has it
        layers = list(range(3, n_layers))
        saes = random_jumprelu_saes(layers, d, args.width, device)
        per_layer = -(-args.candidates // len(layers))
        ranked = ranked_latents(saes, torch.randn(d), per_layer)
        cands = candidate_set(ranked, per_layer)[:args.candidates]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, args.tokens), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        token_ids = [min(235285, vocab - 1)]  # Gemma's "I" (any token of a smaller vocabulary)
        out.update(shape=args.random_shape, width=args.width, layers=f"3-{n_layers - 1}", tokens=args.tokens)

    forwards = {"n": 0}

    layer_rows = [0, 0]  # with shared rows: rows computed at the ablated layers, vs one row per set
    prefix: dict[bool, int] = {}

    def prob(member, share_rows=True, compile="off"):
        forwards["n"] += member.shape[0]
        # refusal_probs_for_batch, keeping the scorer to read its row counts
        scorer = batch_scorer(model, n_layers, batch, token_ids, saes, cands, member.shape[0],
                              batch_size=args.batch_size, share=args.share, share_rows=share_rows, compile=compile)
        p = scorer(member)
        # the most positions served from a shared key/value cache (then nothing compiles), per row sharing
        prefix[share_rows] = max(prefix.get(share_rows, 0), scorer.p0)
        if share_rows:
            layer_rows[:] = [a + b for a, b in zip(layer_rows, scorer.layer_rows)]
        return p

    prob(torch.ones(2, len(cands), dtype=torch.bool))  # warm-up (CUDA kernels, allocator)
    forwards["n"] = 0
    times = []
    for _ in range(args.repeats):
        forwards["n"] = 0
        sync(device)
        t0 = time.perf_counter()
        layer_rows[:] = [0, 0]
        kept, chains = prune_batched(cands, prob, TAUS, seeds)
        sync(device)
        times.append(time.perf_counter() - t0)
    t_batched = min(times)
    out.update(share=args.share, batch_size=args.batch_size, stage2_batched_runs_s=[round(t, 3) for t in times])
    out.update(candidates=len(cands), seeds=seeds, taus=TAUS, stage2_batched_s=round(t_batched, 3),
               stage2_batched_layer_rows_computed_vs_one_per_set=list(layer_rows),
               stage2_sets_scored=forwards["n"],
               kept_sizes={f"{t:g}": [len(kept[(t, s)]) for s in seeds] for t in TAUS},
               cached_prefix_tokens=prefix[True])
    partial(out)

    def timed_variant(runs: int, **kw):
        """Batched Stage 2 ``runs`` times with ``prob``'s options ``kw``: (seconds per run, kept sets, chains)."""
        secs = []
        for _ in range(runs):
            sync(device)
            t0 = time.perf_counter()
            kept_v, chains_v = prune_batched(cands, lambda m: prob(m, **kw), TAUS, seeds)
            sync(device)
            secs.append(time.perf_counter() - t0)
        return secs, kept_v, chains_v

    def profile_path(tag: str) -> str:
        return args.profile if not tag else args.profile.replace(".txt", "") + f".{tag}.txt"

    if args.profile:
        out["profile_matmul_share"] = profile_stage2(lambda: prune_batched(cands, prob, TAUS, seeds), device,
                                                     profile_path(""))
    t_off = None
    if args.rows_off:
        # as many runs as the shared-rows timing, best kept
        times_off, kept_off, chains_off = timed_variant(args.repeats, share_rows=False)
        t_off = min(times_off)
        dp = max(abs(a - b) for c, cc in zip(chains, chains_off) for a, b in zip(c.probs, cc.probs))
        out.update(stage2_rows_off_runs_s=[round(t, 3) for t in times_off], stage2_rows_off_s=round(t_off, 3),
                   rows_off_same_sets=kept_off == kept, rows_off_max_abs_p_diff=float(f"{dp:.3g}"),
                   rows_off_cached_prefix_tokens=prefix[False], speedup_shared_rows=round(t_off / t_batched, 2))
        partial(out)
    if args.compile_scoring:
        from torch._dynamo.utils import counters

        mode = args.compile_scoring
        # shared rows (as the main timing) and, with --rows-off, one row per set, each compared with its eager
        # variant's P; the first run of the first variant compiles (the second reuses its graphs unless it needs a
        # new kind), the best of the later runs is reported; with a shared key/value cache nothing compiles (see
        # cached_prefix_tokens), and compiled_graphs counts dynamo's graphs after each variant
        variants = [("", True, t_batched, chains)] + ([("_rows_off", False, t_off, chains_off)] if args.rows_off
                                                      else [])
        for tag, rows, eager_s, eager_chains in variants:
            times_c, kept_c, chains_c = timed_variant(args.repeats + 1, share_rows=rows, compile=mode)
            out.setdefault("compiled_graphs", []).append(int(counters["stats"]["unique_graphs"]))
            t_c = min(times_c[1:])
            dp = max(abs(a - b) for c, cc in zip(eager_chains, chains_c) for a, b in zip(c.probs, cc.probs))
            out.update({f"stage2_compiled{tag}_first_s": round(times_c[0], 3),
                        f"stage2_compiled{tag}_runs_s": [round(t, 3) for t in times_c[1:]],
                        f"stage2_compiled{tag}_s": round(t_c, 3), f"compiled{tag}_same_sets": kept_c == kept,
                        f"compiled{tag}_max_abs_p_diff": float(f"{dp:.3g}"),
                        f"speedup_compiled{tag}": round(eager_s / t_c, 2)})
            if args.profile:
                out[f"profile_compiled{tag}_matmul_share"] = profile_stage2(
                    lambda: prune_batched(cands, lambda m: prob(m, share_rows=rows, compile=mode), TAUS, seeds),
                    device, profile_path(f"compiled{tag}"))
            partial(out)
        out["compile_scoring"] = mode
    if args.skip_inactive:
        from refusalscope.stages.stage2 import build_chains_skipping

        sync(device)
        t0 = time.perf_counter()
        scorer = SetScorer(model, n_layers, batch, token_ids, saes, cands, batch_size=args.batch_size, share=args.share)
        chains, stats = build_chains_skipping(cands, lambda m: scorer(m, fired=True), seeds, batch_size=args.batch_size)
        sync(device)
        t_skip = time.perf_counter() - t0
        out.update(stage2_skipping_s=round(t_skip, 3), stage2_skipping_sets_scored=stats["scored"],
                   stage2_skipping_steps_skipped=stats["skipped"],
                   skipping_same_sets=all(c.kept(t) == kept[(t, c.seed)] for c in chains for t in TAUS),
                   skipping_layer_rows_computed_vs_one_per_set=scorer.layer_rows,
                   speedup_skipping=round(t_batched / t_skip, 2))
    if seq_taus:
        forwards["n"] = 0
        sync(device)
        t0 = time.perf_counter()
        same = True
        seq_seeds = [int(x) for x in args.sequential_seeds.split(",")] if args.sequential_seeds else seeds
        for t in seq_taus:
            for s in seq_seeds:
                same &= prune_sequential(cands, prob, t, s) == kept[(t, s)]
        sync(device)
        t_seq = time.perf_counter() - t0
        per_tau = t_seq / len(seq_taus) * len(seeds) / len(seq_seeds)
        out.update(sequential_taus=seq_taus, sequential_seeds=seq_seeds, stage2_sequential_s=round(t_seq, 2),
                   sequential_forward_sets=forwards["n"], identical_to_batched=bool(same),
                   sequential_all_taus_estimate_s=round(per_tau * len(TAUS), 2),
                   speedup_batched_vs_sequential_all_taus=round(per_tau * len(TAUS) / t_batched, 1))
    if t_stage1 is not None:
        out["stages_1_2_s"] = round(t_stage1 + t_batched, 2)
        if args.skip_inactive:
            out["stages_1_2_skipping_s"] = round(t_stage1 + t_skip, 2)
    emit(out)


if __name__ == "__main__":
    main()
