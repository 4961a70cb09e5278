"""`duokit score PRED.jsonl`: VNBench scores of a prediction file in any supported format."""

from __future__ import annotations

import argparse
import json
import sys

from duokit.data.scoring import PARSERS, read_predictions, score_predictions, write_eval_py_jsonl
from duokit.data.vnbench import PAPER_LABELS

SUMMARY_KEYS = ("subtasks", "families", "overall", "overall_1try", "n_samples", "n_unparsed")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="score VNBench predictions (4-try circular and 1-try)",
        description="Score a VNBench prediction file: duokit records, official eval.py input or "
                    "official llava_examples/evaluation_utils.py input (detected per file).")
    parser.add_argument("predictions", metavar="PRED.jsonl", help="prediction file (JSONL)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--parser", choices=PARSERS, default=None,
                        help="re-parse every raw answer with this parser (default: each record's own rule, "
                             "i.e. the official script's rule for official files); see docs/scoring.md")
    parser.add_argument("--export-eval-py", metavar="OUT.jsonl", default=None,
                        help="also write the predictions as input for the official evaluation/eval.py")
    parser.set_defaults(func=run)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(scores: dict) -> str:
    """The human-readable report: the 9 sub-tasks under paper labels, family means, Overall."""
    header = (f"{'sub-task':<12} {'paper':<8} {'4-try %':>8} {'1-try %':>8} {'correct/samples':>16} "
              f"{'incomplete':>10}")
    rows = [header]
    for subtask, row in scores["subtasks"].items():
        rows.append(f"{subtask:<12} {PAPER_LABELS[subtask]:<8} {_percent(row['accuracy']):>8} "
                    f"{_percent(row['accuracy_1try']):>8} {row['n_correct']:>8}/{row['n_samples']:<7} "
                    f"{row['n_incomplete']:>10}")
    families = "  ".join(f"{family} {_percent(mean)}" for family, mean in scores["families"].items())
    rows += [
        f"family means (4-try %): {families}",
        f"Overall (4-try circular, mean of sub-tasks): {_percent(scores['overall'])}%",
        f"Overall (1-try, per-try accuracy):           {_percent(scores['overall_1try'])}%",
        (f"samples {scores['n_samples']}, tries {scores['n_records']}, unparsed {scores['n_unparsed']}, "
         f"incomplete samples {scores['n_incomplete']} (counted wrong), parser {scores['parser']}"),
    ]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    try:
        predictions = read_predictions(args.predictions)
        scores = score_predictions(predictions.records, parser=args.parser)
    except (ValueError, FileNotFoundError) as err:
        print(f"duokit score: error: {err}", file=sys.stderr)
        return 1
    if args.export_eval_py:
        write_eval_py_jsonl(predictions.records, args.export_eval_py)
    if args.json:
        summary = {key: scores[key] for key in SUMMARY_KEYS}
        summary.update({key: scores[key] for key in scores if key not in summary})
        summary.update(format=predictions.format, skipped_lines=predictions.skipped_lines)
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{predictions.path} ({predictions.format} format"
          + (f"; {predictions.skipped_lines} line(s) skipped: null pred or torn last line" if
             predictions.skipped_lines else "") + ")")
    print(format_table(scores))
    if args.export_eval_py:
        print(f"wrote {args.export_eval_py} (run: python evaluation/eval.py --path {args.export_eval_py})")
    return 0
