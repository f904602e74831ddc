"""benchmarks/gpu_checks.sh runs only on a lent GPU machine, where a renamed flag would cost a device session:
every benchmark command line it holds must parse with that benchmark's own argument parser."""

import re
import shlex

from helpers import BENCHMARKS, load_benchmark


def _commands() -> list[tuple[str, list[str]]]:
    """(benchmark, argv) of every ``python3 NAME.py ...`` line, shell variables replaced by their defaults."""
    text = (BENCHMARKS / "gpu_checks.sh").read_text().replace("\\\n", " ")
    text = re.sub(r"\$\{[A-Z_0-9]+:-([^}]*)\}", r"\1", text)  # ${VAR:-default} -> default
    text = re.sub(r"\$(OUT|c|g)\b", lambda m: {"OUT": "/tmp/out", "c": "5", "g": "4"}[m.group(1)], text)
    out = []
    for line in text.splitlines():
        m = re.search(r"python3 (\w+)\.py (.*)", line)
        if m:
            out.append((m.group(1), shlex.split(m.group(2).split(" | ")[0])))
    return out


def test_every_benchmark_line_parses(monkeypatch):
    commands = _commands()
    names = [name for name, _ in commands]
    assert names.count("pipeline_gpu") >= 10 and names.count("bench_stages") >= 3  # the script's lines were found
    pipeline = load_benchmark(monkeypatch, "pipeline_gpu")
    stages = load_benchmark(monkeypatch, "bench_stages")
    for name, argv in commands:
        assert not any("$" in a for a in argv), argv  # every variable was replaced
        if name == "pipeline_gpu":
            args = pipeline.parse_args(argv)
            assert args.device == "cuda" or args.toy
        else:
            assert name == "bench_stages", name
            assert stages.arg_parser().parse_args(argv).device == "cuda"
