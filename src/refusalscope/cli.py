"""Command line: parse options, call the API, print. No logic of its own.

Options come from flags, ``REFUSALSCOPE_*`` environment variables and ``--config FILE.toml`` (flags win); the
resolved options are saved in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from pydantic import BaseModel

from refusalscope import __version__
from refusalscope.config import (
    AsrSettings,
    DirectionSettings,
    InteractionSettings,
    RunSettings,
    SaeEvalSettings,
    SaeTrainSettings,
    resolve,
)
from refusalscope.errors import RefusalScopeError


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel], prefix: str = "") -> None:
    """One flag per settings field; unset flags stay absent so env/TOML/defaults can fill them.

    A field that is itself a model (``run``'s ``direction`` and ``sae_train``) gets dotted flags:
    ``--direction.n-train 64``.
    """
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            add_settings_arguments(parser, ann, prefix=f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag", "--" + (prefix + name).replace("_", "-"))
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
        kw: dict = {"dest": prefix + name, "default": argparse.SUPPRESS, "help": (field.description or "") + default}
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kw.update(type=_comma_list, metavar="A,B")
        elif origin is typing.Literal:
            kw["choices"] = list(args)
        kw.update({k: extra[k] for k in ("nargs", "const", "metavar") if k in extra})  # e.g. --ray [ADDRESS]
        if field.is_required():
            kw["help"] += " [required]"
        parser.add_argument(flag, **kw)


def _settings(args, cls, command):
    flags: dict = {}
    for key, value in vars(args).items():
        head, _, rest = key.partition(".")
        if head not in cls.model_fields:
            continue
        if rest:  # a dotted flag of a nested options model
            flags.setdefault(head, {})[rest] = value
        else:
            flags[key] = value
    return resolve(cls, flags, args.config, command)


def _print_table(frame, columns) -> None:
    cols = [c for c in columns if c in frame.columns]
    with __import__("pandas").option_context("display.width", 160, "display.max_rows", 200):
        print(frame[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def cmd_direction(args) -> int:
    from refusalscope.direction import run_direction
    from refusalscope.lm.loading import load_model
    from refusalscope.pipeline.steps import run_record, write_config
    from refusalscope.store import RunStore

    settings: DirectionSettings = _settings(args, DirectionSettings, "direction")
    store = RunStore(settings.out)
    write_config(store, "config.direction.json", settings)
    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype, chat_template=settings.chat_template)
    write_config(store, "run.json", run_record(settings, lm))
    summary = run_direction(lm, settings, store)
    table = store.read_table("direction_candidates.parquet")
    _print_table(
        table,
        [
            "layer",
            "position",
            "norm",
            "ablation_score",
            "kl",
            "steer_score",
            "passes",
            "asr",
            "degenerate_rate",
            "selected",
        ],
    )
    if summary["note"]:
        print(f"note: {summary['note']}")
    print(
        f"l* = {summary['layer']} (position {summary['position']}), held-out ASR under ablation "
        f"{summary['selected_asr']:.2f}, |r| = {summary['norm']:.2f}"
    )
    print(
        f"saved to {store.root}: direction.safetensors, direction.json, direction_candidates.parquet, "
        "cosine_diagnostics.parquet/.png"
    )
    return 0


def cmd_asr(args) -> int:
    from refusalscope.asr import run_asr
    from refusalscope.store import RunStore

    settings: AsrSettings = _settings(args, AsrSettings, "asr")
    store = RunStore(settings.run, create=False)
    lm, run = _run_model(settings, store)
    summary = run_asr(lm, settings, store, data_dir=run.get("data_dir"))
    if settings.json_output:
        print(json.dumps({k: summary[k] for k in ("n", "asr", "refusal_rate", "degenerate_rate")}))
    else:
        print(
            f"{summary['n']} prompts ({summary['intervention']}, judge {summary['judge']}): "
            f"ASR {summary['asr']:.3f}, refusal rate {summary['refusal_rate']:.3f}, "
            f"degenerate {summary['degenerate_rate']:.3f}"
            + (
                f"; {summary['dropped_overlap']} prompts seen in training were dropped"
                if summary["dropped_overlap"]
                else ""
            )
        )
    return 0


def _run_model(settings, store):
    """Load the model a run was made with (device/dtype flags override the run's)."""
    from refusalscope.pipeline.steps import load_recorded_model

    return load_recorded_model(
        store,
        device=settings.device if "device" in settings.model_fields_set else None,
        dtype=settings.dtype if "dtype" in settings.model_fields_set else None,
        chat_template=settings.chat_template,
    )


def _print_sae_report(table, as_json: bool) -> None:
    cols = ["layer", "fvu", "l0", "dead_frac", "ce_increase"]
    if as_json:
        print(
            json.dumps(
                [{c: (int(r[c]) if c == "layer" else round(float(r[c]), 4)) for c in cols} for _, r in table.iterrows()]
            )
        )
    else:
        _print_table(table, cols + ["tokens"])


def cmd_sae_train(args) -> int:
    from refusalscope.pipeline.steps import write_config
    from refusalscope.saes.run_set import run_sae_train
    from refusalscope.store import RunStore

    settings: SaeTrainSettings = _settings(args, SaeTrainSettings, "sae-train")
    store = RunStore(settings.run, create=False)
    lm, run = _run_model(settings, store)
    write_config(store, "config.sae_train.json", settings)
    table = run_sae_train(lm, settings, store, settings.data_dir or run.get("data_dir"))
    if not settings.json_output:
        print(f"SAEs recorded in {store.path('saes.json')}; quality on held-out text:")
    _print_sae_report(table, settings.json_output)
    return 0


def cmd_sae_eval(args) -> int:
    from refusalscope.saes.run_set import run_sae_eval
    from refusalscope.store import RunStore

    settings: SaeEvalSettings = _settings(args, SaeEvalSettings, "sae-eval")
    store = RunStore(settings.run, create=False)
    lm, run = _run_model(settings, store)
    table = run_sae_eval(lm, settings, store, settings.data_dir or run.get("data_dir"))
    _print_sae_report(table, settings.json_output)
    return 0


def cmd_run(args) -> int:
    from refusalscope.pipeline.run import run_pipeline

    settings: RunSettings = _settings(args, RunSettings, "run")
    summary = run_pipeline(settings)
    print(
        f"{summary['n_prompts']} prompts, {summary['n_refused_baseline']} refused at baseline, "
        f"{summary['n_processed']} processed"
    )
    st1 = summary["stage1"]
    print(f"stage 1: {st1['jailbroken']}/{summary['n_processed']} jailbroken (mean K {st1['mean_k']})")
    if "stage2" in summary:
        st2 = summary["stage2"]
        for tau, row in st2["per_tau"].items():
            print(f"stage 2: tau {tau}: {row['jailbroken']}/{row['n']} jailbroken, mean set size {row['mean_size']}")
        rc = summary["random_control"]
        print(
            f"stage 2 best tau {st2['best_tau']}: {st2['jailbroken']} jailbroken; random controls "
            f"{rc['jailbroken']}/{rc['n']}"
        )
    if "stage3" in summary:
        _print_stage3(summary["stage3"])
    print(
        f"results in {settings.out}: summary.json, stage1.parquet, stage2.parquet, stage2_chains.parquet, "
        "controls.parquet, stages.png, prompts/"
        + (", stage3.parquet, stage3.png, stage3/" if "3" in settings.stages else "")
    )
    return 0


def _print_stage3(st3: dict) -> None:
    n = st3["n_prompts"]
    print(
        f"stage 3: FM test accuracy {st3['fm_test_accuracy']:.3f} (AUROC {st3['fm_test_auroc']:.3f}), probe "
        f"{st3['probe_test_accuracy']:.3f}; columns {st3['mode']}"
    )
    print(
        f"stage 3: FM ranking jailbroken {st3['fm']['jailbroken']}/{n} (median K {st3['fm']['best_k']}), "
        f"probe {st3['probe']['jailbroken']}/{n}, Stage-3 features alone {st3['stage3_only']['jailbroken']}/"
        f"{st3['stage3_only']['n']}"
    )
    for k, row in st3["probe_equal_k"].items():
        print(f"stage 3: K = {k}: FM {row['fm']}/{row['n']}, probe {row['probe']}/{row['n']}")
    failed = st3.get("stage2_failed")
    if failed and failed["n"]:
        print(f"stage 3, prompts whose Stage-2 set alone did not jailbreak: FM {failed['fm']['jailbroken']}/"
              f"{failed['n']}, probe {failed['probe']['jailbroken']}/{failed['n']}")
    c = st3["causal"]
    if c["n"]:
        print(
            f"stage 3 → stage 2: {c['deactivated_frac']:.2f} of active Stage-2 features switch off, the rest "
            f"drop by {c['mean_drop'] if c['mean_drop'] is not None else float('nan'):.2f} on average"
        )


def cmd_interactions(args) -> int:
    from refusalscope.pipeline.run import run_interactions

    settings: InteractionSettings = _settings(args, InteractionSettings, "interactions")
    summary = run_interactions(settings)
    _print_stage3(summary["stage3"])
    print(f"results in {settings.run}: summary.json (stage3), stage3.parquet, stage3.png, stage3/")
    return 0


def cmd_analyze(args) -> int:
    from refusalscope.analysis.registry import analysis_module, output_dir, run_analysis
    from refusalscope.config import ANALYSIS_SETTINGS

    name = args.analysis
    settings = _settings(args, ANALYSIS_SETTINGS[name], f"analyze.{name}")
    summary = run_analysis(name, settings)
    for line in analysis_module(name).summary_lines(summary):
        print(line)
    print(f"results in {settings.run / output_dir(name)}/")
    return 0


def _run_dir(args) -> None:
    """``report`` and ``annotate`` take the run directory as RUN_DIR or as --run."""
    given = getattr(args, "run_dir", None)
    if given is not None:
        if getattr(args, "run", given) != given:
            raise RefusalScopeError(f"two run directories given: {given} and --run {args.run}")
        args.run = given


def cmd_report(args) -> int:
    from refusalscope.config import ReportSettings
    from refusalscope.report.build import build_report

    _run_dir(args)
    settings: ReportSettings = _settings(args, ReportSettings, "report")
    path, sections = build_report(settings)
    missing = [s.key for s in sections if s.missing]
    print(f"{len(sections) - len(missing)} of {len(sections)} sections" +
          (f"; not in this run: {', '.join(missing)}" if missing else ""))
    for s in sections:
        for note in s.notes:
            print(f"note ({s.key}): {note}")
    print(f"report written to {path} (self-contained: open it in any browser, offline)")
    return 0


def cmd_annotate(args) -> int:
    from refusalscope.annotate.app import serve
    from refusalscope.config import AnnotateSettings

    _run_dir(args)
    settings: AnnotateSettings = _settings(args, AnnotateSettings, "annotate")
    serve(settings, say=lambda line: print(line, flush=True))
    return 0


def cmd_models(args) -> int:
    from refusalscope.lm.registry import MODELS

    for e in MODELS.values():
        print(
            f"{e.alias:32s} {e.hub_id:40s} refusal tokens {list(e.refusal_tokens)}"
            + ("  [embedded default]" if e.embedded else "")
        )
    return 0


def cmd_datasets(args) -> int:
    from refusalscope.data import DATASETS

    for name, e in DATASETS.items():
        print(f"{name:18s} {e.file:30s} column {e.column!r:14s} {e.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusalscope", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"refusalscope {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="TOML file of options (flags and env vars win)")
    common.add_argument("-v", "--verbose", action="store_true", help="more log output")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, func in (
        ("direction", DirectionSettings, cmd_direction),
        ("asr", AsrSettings, cmd_asr),
        ("run", RunSettings, cmd_run),
        ("interactions", InteractionSettings, cmd_interactions),
    ):
        p = sub.add_parser(name, parents=[common], help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        add_settings_arguments(p, cls)
        p.set_defaults(func=func)
    sae = sub.add_parser("sae", help="train, reuse and evaluate the run's SAEs").add_subparsers(
        dest="sae_command", required=True
    )
    for name, cls, func in (("train", SaeTrainSettings, cmd_sae_train), ("eval", SaeEvalSettings, cmd_sae_eval)):
        p = sae.add_parser(name, parents=[common], help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        add_settings_arguments(p, cls)
        p.set_defaults(func=func)
    from refusalscope.config import ANALYSIS_SETTINGS

    analyze = sub.add_parser("analyze", help="analyses of a finished run (hydra, controls, ce, clamp, taxonomy, "
                             "explain)").add_subparsers(dest="analysis", required=True)
    for name, cls in ANALYSIS_SETTINGS.items():
        p = analyze.add_parser(name, parents=[common], help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        add_settings_arguments(p, cls)
        p.set_defaults(func=cmd_analyze)
    from refusalscope.config import AnnotateSettings, ReportSettings

    for name, cls, func in (("report", ReportSettings, cmd_report), ("annotate", AnnotateSettings, cmd_annotate)):
        p = sub.add_parser(name, parents=[common], help=cls.__doc__.splitlines()[0], description=cls.__doc__)
        p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", default=None, help="run directory (or --run)")
        add_settings_arguments(p, cls)
        p.set_defaults(func=func)
    for name, func, text in (
        ("models", cmd_models, "list the model registry"),
        ("datasets", cmd_datasets, "list the named prompt sets"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="refusalscope: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except RefusalScopeError as e:
        print(f"refusalscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refusalscope: interrupted; files already written in the run directory are complete", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: short message unless --debug
        if args.debug:
            raise
        print(
            f"refusalscope: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
