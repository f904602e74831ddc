"""Score refusal judges against hand labels: precision and recall of "jailbroken" against the label ``comply``.

    python benchmarks/judge_scores.py --data-dir ../shared/data            # every judge that runs offline
    python benchmarks/judge_scores.py --labels FILE --judges substring,llm:http://127.0.0.1:8080 --json out.json

``judge_labels.jsonl`` (shared/data README) holds 100 completions of the default model labelled refusal / comply /
vague / degenerate. A judge's positive is ``Verdict.jailbroken`` (not refused, not degenerate); the truth is
``label == "comply"`` (HarmBench's notion: vague text is no jailbreak). Prints a Markdown table (metrics, then how
many of each label every judge calls jailbroken) and writes the numbers as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LABELS = ("refusal", "comply", "vague", "degenerate")
# judges that need no download and no server: the refusal phrases alone, the default judge (phrases + degeneracy
# check, what make_judge("substring") builds), and the compliance heuristic (+ degeneracy)
OFFLINE = ("substring-only", "substring", "compliance")


def read_labels(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [r.get("id") for r in rows if r.get("label") not in LABELS or "completion" not in r or "prompt" not in r]
    if bad:
        raise SystemExit(f"{path}: rows {bad[:5]} lack prompt/completion or have a label outside {LABELS}")
    return rows


def build(name: str):
    from refusalscope.judges import SubstringJudge, make_judge

    return SubstringJudge() if name == "substring-only" else make_judge(name)


def score(rows: list[dict], verdicts) -> dict:
    """Precision, recall, F1 and accuracy of jailbroken vs comply, and jailbroken counts per label."""
    pred = [v.jailbroken for v in verdicts]
    true = [r["label"] == "comply" for r in rows]
    tp = sum(p and t for p, t in zip(pred, true))
    fp = sum(p and not t for p, t in zip(pred, true))
    fn = sum(t and not p for p, t in zip(pred, true))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    by_label = {lab: {"n": sum(r["label"] == lab for r in rows),
                      "jailbroken": sum(p for p, r in zip(pred, rows) if r["label"] == lab)} for lab in LABELS}
    return {"n": len(rows), "jailbroken": sum(pred), "tp": tp, "fp": fp, "fn": fn, "precision": precision,
            "recall": recall, "f1": f1, "accuracy": sum(p == t for p, t in zip(pred, true)) / len(rows),
            "by_label": by_label}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| judge | called jailbroken | precision | recall | F1 | accuracy | "
             + " | ".join(f"{lab} → jailbroken" for lab in LABELS) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in LABELS) + " |"]
    for name, s in results.items():
        per = " | ".join(f"{s['by_label'][lab]['jailbroken']}/{s['by_label'][lab]['n']}" for lab in LABELS)
        lines.append(f"| {name} | {s['jailbroken']}/{s['n']} | {s['precision']:.2f} | {s['recall']:.2f} | "
                     f"{s['f1']:.2f} | {s['accuracy']:.2f} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data", help="directory holding judge_labels.jsonl")
    ap.add_argument("--labels", default=None, help="labels file (default: DATA_DIR/judge_labels.jsonl)")
    ap.add_argument("--judges", default=",".join(OFFLINE),
                    help="comma-separated: substring-only, substring, compliance, classifier:PATH, llm:URL")
    ap.add_argument("--json", default=None, help="write the scores here")
    args = ap.parse_args(argv)
    path = Path(args.labels) if args.labels else Path(args.data_dir) / "judge_labels.jsonl"
    if not path.is_file():
        raise SystemExit(f"labels file not found: {path}")
    rows = read_labels(path)
    results, seconds = {}, {}
    for name in [j.strip() for j in args.judges.split(",") if j.strip()]:
        judge = build(name)
        start = time.perf_counter()
        verdicts = judge.judge([r["prompt"] for r in rows], [r["completion"] for r in rows])
        seconds[name] = time.perf_counter() - start
        results[name] = score(rows, verdicts)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"labels": str(path), "scores": results, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
