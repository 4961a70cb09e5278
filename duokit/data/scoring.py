"""VNBench scoring: answer parsers, 4-try circular scoring, and the official file formats in and out.

Facts come from the two official scripts of github.com/joez17/VideoNIAH (docs/scoring.md).
Everything is scored from duokit prediction records (`prediction_record`); the two official input
formats are read into the same shape, keeping the verdict rule of the script that reads them, so
`score_predictions` on an official file gives that script's numbers (docs/scoring.md).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from duokit.data.vnbench import FAMILIES, LETTERS, PAPER_LABELS, SUBTASKS, Record, subtask_from_video
from duokit.io import atomic_write_text

# official: evaluation/eval.py; first_char: llava_examples/evaluation_utils.py (github.com/joez17/VideoNIAH).
PARSERS = ("official", "strict", "text", "first_char")
TRIES_PER_SAMPLE = 4  # evaluation/eval.py: a sample is right only if all 4 tries are

# strict: an optional lead-in, then one letter written alone, in brackets, or followed by . ) : or ,
_STRICT = re.compile(
    r"(?i:(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
    r"(?:\((?P<paren>[A-D])\)|\[(?P<bracket>[A-D])\]|(?P<bare>[A-D])(?:[.):,]|$))"
    r"(?P<rest>.*)",
    re.DOTALL,
)
_LETTER_WORD = re.compile(r"\b[A-D]\b")


def _normalise(text: str) -> str:
    """Lower case, punctuation as spaces, whitespace collapsed: 'Sam, Grace.' -> 'sam grace'."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.casefold()).split())


def _official(text: str) -> str | None:
    # eval.py: pred.split('.')[0], then the first of A, B, C, D (in that order) found anywhere. Its
    # fallback compares the remaining string with gt, which can never equal a letter gt: unparsed.
    head = text.split(".")[0]
    return next((letter for letter in LETTERS if letter in head), None)


def _first_char(text: str) -> str | None:
    # evaluation_utils.py: pred[0] == gt (it crashes on an empty pred; here that is unparsed).
    return text[0] if text and text[0] in LETTERS else None


def _strict(text: str, options: list[str] | tuple[str, ...] | None) -> str | None:
    match = _STRICT.fullmatch(text.strip())
    if not match:
        return None
    letter = match["paren"] or match["bracket"] or match["bare"]
    rest = _normalise(match["rest"])
    if not rest:
        return letter
    if options is not None:  # the text after the letter must be that option's own text
        return letter if rest == _normalise(str(options[LETTERS.index(letter)])) else None
    return None if _LETTER_WORD.search(match["rest"]) else letter


def _text(text: str, options: list[str] | tuple[str, ...] | None) -> str | None:
    if options is None:
        raise ValueError("the 'text' parser matches the answer to the option texts; pass options=")
    answer = _normalise(text)
    # An option that normalises to nothing (pure punctuation) would occur in every answer: skip it.
    named = [(LETTERS[i], _normalise(str(option))) for i, option in enumerate(options)]
    named = [(letter, option) for letter, option in named if option]
    exact = [letter for letter, option in named if option == answer]
    if len(exact) == 1:
        return exact[0]
    occurring = [letter for letter, option in named if f" {option} " in f" {answer} "]
    return occurring[0] if len(occurring) == 1 else None


def parse_answer(text: str | None, parser: str = "official", options=None) -> str | None:
    """The option letter A-D that `text` answers under `parser`, or None if it names none.

    official: eval.py's rule — keep the text before the first '.', then the first of 'A', 'B', 'C',
      'D' (in that priority order) occurring anywhere in it.
    strict: the whole answer (stripped) is an optional lead-in ("The answer is", "Answer:",
      "Option", …, case-insensitive), then one upper-case letter written `X`, `(X)`, `[X]`, `X.`,
      `X)`, `X:` or `X,`, then optional text. Any text after the letter must equal that option's
      text (normalised) when options are given; without options it must not contain another
      stand-alone A-D. So "B", "(B)", "B. banana", "The answer is B" -> B; "A or B", "I think B",
      "b", "A banana" -> None.
    text: for answers in words — the option whose normalised text equals the normalised answer, or
      else the only option whose normalised text occurs (as whole words) in it; needs `options`.
    first_char: evaluation_utils.py's rule — the first character, if it is A-D.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; choose one of {', '.join(PARSERS)}")
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}: {text!r}")
    if parser == "official":
        return _official(text)
    if parser == "first_char":
        return _first_char(text)
    if parser == "strict":
        return _strict(text, options)
    return _text(text, options)


PREDICTION_KEYS = ("record_id", "sample_id", "video", "subtask", "label", "try", "question", "options",
                   "gt", "gt_option", "raw_output", "parser", "pred_letter", "correct", "error")


def prediction_record(record: Record, raw_output: str | None, parser: str, error: str | None = None,
                      **extra: Any) -> dict:
    """duokit's prediction record for one try; a try that failed (`error`) is wrong and unparsed."""
    clash = sorted(set(extra) & set(PREDICTION_KEYS))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite prediction fields")
    pred_letter = None if error else parse_answer(raw_output, parser, record.options)
    return {
        "record_id": record.record_id, "sample_id": record.sample_id, "video": record.video,
        "subtask": record.subtask, "label": record.label, "try": record.try_index,
        "question": record.question, "options": list(record.options), "gt": record.gt,
        "gt_option": record.gt_option, "raw_output": raw_output, "parser": parser,
        "pred_letter": pred_letter, "correct": pred_letter == record.gt_option, "error": error,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Reading prediction files: duokit records, eval.py input, evaluation_utils.py input.

FORMATS = {
    "duokit": ("record_id", "sample_id", "subtask", "try", "gt_option", "raw_output", "parser", "error"),
    "eval_py": ("question_id", "pred", "gt", "type"),
    "evaluation_utils": ("video_path", "task_type", "pred", "gt"),
}


class PredictionFormatError(ValueError):
    """A prediction file line that no supported format can read."""


@dataclass(frozen=True)
class PredictionFile:
    path: Path
    format: str  # a key of FORMATS
    records: list[dict]  # duokit prediction records
    skipped_lines: int  # eval.py lines with a null pred (eval.py skips them) and a torn last line


def detect_format(line: dict) -> str | None:
    """The format whose required keys `line` has (duokit's first), or None."""
    return next((name for name, keys in FORMATS.items() if all(k in line for k in keys)), None)


def read_predictions(path: str | Path) -> PredictionFile:
    """Read a JSONL prediction file in any supported format into duokit prediction records.

    The format is taken from the first line; every line must be in it. Errors name file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prediction file not found")
    lines = path.read_text(encoding="utf-8").split("\n")
    file_format, records, skipped = None, [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: an append interrupted by a crash
                skipped += 1
                continue
            raise PredictionFormatError(f"{where}: not valid JSON ({err}); expected one object per line") from err
        if not isinstance(raw, dict):
            raise PredictionFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if file_format is None:
            file_format = detect_format(raw)
            if file_format is None:
                raise PredictionFormatError(
                    f"{where}: unknown prediction format (keys {sorted(raw)}); expected the keys of one of: "
                    + "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMATS.items()))
        missing = [k for k in FORMATS[file_format] if k not in raw]
        if missing:
            raise PredictionFormatError(f"{where}: a {file_format}-format file, but this line lacks {missing}")
        if file_format == "eval_py" and raw["pred"] is None:
            skipped += 1  # eval.py: `if anno['pred'] is None: continue`
            continue
        records.append(_READERS[file_format](raw, where))
    if not records:
        raise PredictionFormatError(f"{path}: no predictions in the file"
                                    + (f" ({skipped} line(s) skipped: null pred or torn last line)" if skipped else ""))
    if file_format == "evaluation_utils":
        _number_tries_by_order(records)
    return PredictionFile(path, file_format, records, skipped)


def _require(condition: bool, where: str, problem: str) -> None:
    if not condition:
        raise PredictionFormatError(f"{where}: {problem}")


def _subtask_in(name: str) -> str | None:
    """The sub-task named inside an id such as '3261112327_ret_insert1' (docs/scoring.md, the label swap)."""
    return next((s for s in SUBTASKS if f"_{s}_" in f"_{name}_"), None)


def _from_duokit(raw: dict, where: str) -> dict:
    _require(raw["subtask"] in SUBTASKS, where, f"subtask {raw['subtask']!r} is not one of {list(SUBTASKS)}")
    _require(raw["gt_option"] in tuple(LETTERS), where, f"gt_option {raw['gt_option']!r} is not A-D")
    _require(raw["parser"] in PARSERS, where, f"parser {raw['parser']!r} is not one of {list(PARSERS)}")
    _require(type(raw["try"]) is int and raw["try"] in range(TRIES_PER_SAMPLE), where,
             f"try {raw['try']!r} is not 0-3")
    _require(raw["raw_output"] is None or isinstance(raw["raw_output"], str), where, "raw_output must be text")
    return dict(raw, source=where)


def _from_eval_py(raw: dict, where: str) -> dict:
    question_id, gt, pred = raw["question_id"], raw["gt"], raw["pred"]
    # eval.py groups by question_id[:-2]; the try is the last character ('<id>_<try>').
    _require(isinstance(question_id, str) and len(question_id) > 2 and question_id[-1] in "0123", where,
             f"question_id {question_id!r} is not '<id>_<try 0-3>'")
    _require(isinstance(pred, str), where, f"pred must be a string or null, got {pred!r}")
    if isinstance(gt, int) and not isinstance(gt, bool) and gt in range(4):
        gt = LETTERS[gt]  # eval.py: chr(ord('A') + gt)
    _require(gt in tuple(LETTERS), where, f"gt {raw['gt']!r} is neither a letter A-D nor an index 0-3")
    sample_id = question_id[:-2]
    subtask = _subtask_in(sample_id) or raw["type"]
    _require(subtask in SUBTASKS, where, f"type {raw['type']!r} is not one of {list(SUBTASKS)}")
    record = _official_record(question_id, sample_id, None, subtask, raw["type"], int(question_id[-1]),
                              gt, pred, "official", where)
    if "gpt_judge" in raw:
        judge = raw["gpt_judge"]
        _require(isinstance(judge, list) and judge, where, f"gpt_judge {judge!r} is not a non-empty list")
        record["judge"] = judge[0] == "1"  # eval.py: judge[0] == '1'
    return record


def _from_evaluation_utils(raw: dict, where: str) -> dict:
    video, gt, pred = raw["video_path"], raw["gt"], raw["pred"]
    _require(isinstance(video, str) and video, where, f"video_path {video!r} is not a path")
    _require(isinstance(pred, str), where, f"pred must be a string, got {pred!r}")
    _require(gt in tuple(LETTERS), where, f"gt {gt!r} is not a letter A-D")
    subtask = subtask_from_video(video) or raw["task_type"]
    _require(subtask in SUBTASKS, where, f"task_type {raw['task_type']!r} is not one of {list(SUBTASKS)}")
    try_index = raw.get("try")  # evaluation_utils.py ignores it; numbered by order when absent
    _require(try_index is None or (type(try_index) is int and try_index in range(TRIES_PER_SAMPLE)),
             where, f"try {try_index!r} is not 0-3")
    sample_id = PurePosixPath(video.replace("\\", "/")).stem
    record = _official_record(None, sample_id, video, subtask, raw["task_type"], try_index, gt, pred,
                              "first_char", where)
    if "judge_result" in raw:
        _require(raw["judge_result"] in (0, 1), where, f"judge_result {raw['judge_result']!r} is not 0 or 1")
        record["judge"] = bool(raw["judge_result"])
    return record


def _official_record(record_id, sample_id, video, subtask, label, try_index, gt_option, pred, parser,
                     where) -> dict:
    pred_letter = parse_answer(pred, parser)
    return {
        "record_id": record_id if record_id is not None else f"{sample_id}_{try_index}",
        "sample_id": sample_id, "video": video, "subtask": subtask, "label": label, "try": try_index,
        "question": None, "options": None, "gt": None, "gt_option": gt_option, "raw_output": pred,
        "parser": parser, "pred_letter": pred_letter, "correct": pred_letter == gt_option, "error": None,
        "source": where,
    }


def _number_tries_by_order(records: list[dict]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for record in records:
        if record["try"] is None:
            record["try"] = seen[record["sample_id"]]
            record["record_id"] = f"{record['sample_id']}_{record['try']}"
        seen[record["sample_id"]] += 1


_READERS = {"duokit": _from_duokit, "eval_py": _from_eval_py, "evaluation_utils": _from_evaluation_utils}


# ---------------------------------------------------------------------------------------------
# Scoring.

def _verdict(record: dict, parser: str | None) -> tuple[bool, bool]:
    """(correct, unparsed) for one try. A judge verdict decides only under the record's own rule."""
    if record.get("error"):
        return False, True
    if parser is None and record.get("judge") is not None:
        return bool(record["judge"]), False
    letter = parse_answer(record.get("raw_output"), parser or record["parser"], record.get("options"))
    return letter == record["gt_option"], letter is None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_predictions(records: list[dict], parser: str | None = None) -> dict:
    """The scorer JSON for duokit prediction records (docs/scoring.md).

    `parser=None` re-parses each record with its own `parser` (and honours a judge verdict, as the
    official scripts do); a parser name re-parses every raw output with that parser instead.
    A sample is correct (4-try) only if all 4 tries are present and correct; a missing try counts as
    wrong, also for 1-try accuracy. Overall = unweighted mean of the sub-task accuracies present.
    """
    if not records:
        raise ValueError("no predictions to score")
    if parser is not None and parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; choose one of {', '.join(PARSERS)}")
    samples: dict[str, dict[int, bool]] = defaultdict(dict)
    subtask_of: dict[str, str] = {}
    n_unparsed = 0
    for record in records:
        where = record.get("source") or f"record {record.get('record_id')!r}"
        sample_id, try_index = record["sample_id"], record["try"]
        if subtask_of.setdefault(sample_id, record["subtask"]) != record["subtask"]:
            raise ValueError(f"{where}: sample {sample_id!r} is both {subtask_of[sample_id]} and "
                             f"{record['subtask']}; one sample is one question about one video")
        if try_index in samples[sample_id]:
            raise ValueError(f"{where}: sample {sample_id!r} try {try_index} appears twice; "
                             "remove the duplicate line")
        if (parser or record["parser"]) == "text" and record.get("options") is None:
            raise ValueError(f"{where}: the 'text' parser needs the options, which only duokit records carry")
        correct, unparsed = _verdict(record, parser)
        samples[sample_id][try_index] = correct
        n_unparsed += unparsed

    per_subtask: dict[str, list[dict[int, bool]]] = defaultdict(list)
    for sample_id, tries in samples.items():
        per_subtask[subtask_of[sample_id]].append(tries)
    subtasks = {}
    for subtask in (s for s in SUBTASKS if s in per_subtask):
        groups = per_subtask[subtask]
        n_correct = sum(len(t) == TRIES_PER_SAMPLE and all(t.values()) for t in groups)
        n_correct_tries = sum(sum(t.values()) for t in groups)
        subtasks[subtask] = {
            "paper_label": PAPER_LABELS[subtask],
            "accuracy": n_correct / len(groups),
            "n_samples": len(groups),
            "n_correct": n_correct,
            "accuracy_1try": n_correct_tries / (TRIES_PER_SAMPLE * len(groups)),
            "n_incomplete": sum(len(t) < TRIES_PER_SAMPLE for t in groups),
        }
    families = {family: _mean([subtasks[s]["accuracy"] for s in members if s in subtasks])
                for family, members in FAMILIES.items()}
    return {
        "subtasks": subtasks,
        "families": families,
        "overall": _mean([v["accuracy"] for v in subtasks.values()]),
        "overall_1try": _mean([v["accuracy_1try"] for v in subtasks.values()]),
        "n_samples": len(samples),
        "n_records": len(records),
        "n_unparsed": n_unparsed,
        "n_incomplete": sum(v["n_incomplete"] for v in subtasks.values()),
        "parser": parser or "per-record",
    }


# ---------------------------------------------------------------------------------------------
# Writing the official eval.py input.

def write_eval_py_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write duokit prediction records as `evaluation/eval.py` input, atomically.

    A failed try is written with pred "" (not null, which eval.py would skip), so eval.py also
    counts it as wrong.
    """
    lines = []
    for record in records:
        pred = "" if record.get("error") or record.get("raw_output") is None else record["raw_output"]
        lines.append(json.dumps({
            "question_id": f"{record['sample_id']}_{record['try']}", "pred": pred,
            "gt": record["gt_option"], "type": record["label"],
        }))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))
