"""VNBench annotations: the schema, validation, sub-tasks, the official prompt and 4-try grouping.

Facts here come from the VNBench paper (arXiv:2406.09367), its annotations (huggingface.co/datasets/
videoniah/VNBench) and the official code (github.com/joez17/VideoNIAH): sub-tasks, label swap, schema, tries,
prompt. The sub-task of a record is taken from its video file-name suffix, which fixes the published
`ret_insert1`/`ret_insert2` label swap; the published `type` is kept as `label`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from duokit.io import read_json

SUBTASKS = (
    "ret_edit1", "ret_insert1", "ret_insert2",
    "ord_edit1", "ord_insert1", "ord_insert2",
    "cnt_edit1", "cnt_edit2", "cnt_insert1",
)
FAMILIES = {family: tuple(t for t in SUBTASKS if t.startswith(family)) for family in ("ret", "ord", "cnt")}
# Column names of the paper's main table (asset/performance.png); I-1 is fruit, I-2 landmark.
PAPER_LABELS = {
    "ret_edit1": "Ret E", "ret_insert1": "Ret I-1", "ret_insert2": "Ret I-2",
    "ord_edit1": "Ord E", "ord_insert1": "Ord I-1", "ord_insert2": "Ord I-2",
    "cnt_edit1": "Cnt E-1", "cnt_edit2": "Cnt E-2", "cnt_insert1": "Cnt I",
}
LETTERS = "ABCD"
# Option order of tries 1..3 as indices into the try-0 order (the published annotations); try 0 is the identity.
TRY_PERMUTATIONS = ((0, 1, 2, 3), (0, 3, 1, 2), (1, 3, 2, 0), (3, 2, 0, 1))
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
FIELDS = ("video", "question", "options", "gt", "gt_option", "type", "try", "needle_time", "length")


class AnnotationError(ValueError):
    """A record that does not follow the VNBench schema."""


def subtask_from_video(video: str) -> str | None:
    """The sub-task named by a `<haystack>_<subtask>.mp4` file name, or None if it names none."""
    stem = PurePosixPath(video.replace("\\", "/")).stem
    for subtask in SUBTASKS:
        if stem.endswith("_" + subtask):
            return subtask
    return None


def official_prompt(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The prompt of the official README and LLaVA example (github.com/joez17/VideoNIAH, llava_examples/)."""
    lines = [question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines + [ANSWER_INSTRUCTION])


def question_part(question: str) -> str:
    """The leading part of `official_prompt` that a sample's tries share: the question line, newline
    included (so the tokenizer does not merge across the split)."""
    return question + "\n"


def permuted_options(options_try0: list[str] | tuple[str, ...]) -> list[list[str]]:
    """The four option orders of a sample, try 0 to try 3, by the official fixed scheme."""
    if len(options_try0) != 4:
        raise ValueError(f"a VNBench sample has 4 options, got {len(options_try0)}")
    return [[options_try0[i] for i in perm] for perm in TRY_PERMUTATIONS]


@dataclass(frozen=True)
class Record:
    """One try of one VNBench question, exactly as in the annotation file (options as strings)."""

    video: str
    question: str
    options: tuple[str, ...]
    gt: str
    gt_option: str
    label: str  # the published `type` field, possibly swapped (docs/scoring.md)
    try_index: int
    needle_time: tuple[float, ...]
    length: float
    subtask: str  # from the file name when it names one, else `label`

    @property
    def video_name(self) -> str:
        return PurePosixPath(self.video.replace("\\", "/")).name

    @property
    def sample_id(self) -> str:
        return PurePosixPath(self.video_name).stem

    @property
    def record_id(self) -> str:
        return f"{self.sample_id}_{self.try_index}"

    @property
    def prompt(self) -> str:
        return official_prompt(self.question, self.options)

    def to_json(self) -> dict[str, Any]:
        return {
            "video": self.video, "question": self.question, "options": list(self.options),
            "gt": self.gt, "gt_option": self.gt_option, "type": self.label, "try": self.try_index,
            "needle_time": list(self.needle_time), "length": self.length,
        }


def _fail(source: str, index: int, field: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{source}: record {index}, field {field!r}: {problem}")


def _number(value: Any, source: str, index: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, index, field, f"expected a number, got {value!r}")
    return float(value)


def parse_record(raw: Any, index: int, source: str = "annotations") -> Record:
    """Validate one raw annotation dict; errors name the source, the record index and the field."""
    if not isinstance(raw, dict):
        raise AnnotationError(f"{source}: record {index}: expected an object, got {type(raw).__name__}")
    for field in FIELDS:
        if field not in raw:
            raise _fail(source, index, field, "missing")
    for field in ("video", "question", "gt_option", "type"):
        if not isinstance(raw[field], str) or not raw[field]:
            raise _fail(source, index, field, f"expected a non-empty string, got {raw[field]!r}")
    options = raw["options"]
    if not isinstance(options, list) or len(options) != 4:
        raise _fail(source, index, "options", f"expected a list of 4 options, got {options!r}")
    if any(isinstance(o, bool) or not isinstance(o, (str, int, float)) for o in options):
        raise _fail(source, index, "options", f"options must be strings or numbers, got {options!r}")
    options = tuple(str(o) for o in options)  # counting options may be ints in the published file
    if any(not o.strip() for o in options):
        raise _fail(source, index, "options", f"options must not be blank, got {list(options)}")
    if len(set(options)) != 4:
        raise _fail(source, index, "options", f"options repeat: {list(options)}")
    if isinstance(raw["gt"], bool) or not isinstance(raw["gt"], (str, int, float)):
        raise _fail(source, index, "gt", f"expected the correct option's value, got {raw['gt']!r}")
    gt = str(raw["gt"])
    if gt not in options:
        raise _fail(source, index, "gt", f"{gt!r} is not one of the options {list(options)}")
    if raw["gt_option"] not in LETTERS:
        raise _fail(source, index, "gt_option", f"expected one of A-D, got {raw['gt_option']!r}")
    if LETTERS[options.index(gt)] != raw["gt_option"]:
        raise _fail(source, index, "gt_option",
                    f"{raw['gt_option']!r} but gt {gt!r} is option {LETTERS[options.index(gt)]}")
    if raw["type"] not in SUBTASKS:
        raise _fail(source, index, "type", f"{raw['type']!r} is not one of {list(SUBTASKS)}")
    try_index = raw["try"]
    if isinstance(try_index, bool) or not isinstance(try_index, int) or try_index not in (0, 1, 2, 3):
        raise _fail(source, index, "try", f"expected 0, 1, 2 or 3, got {try_index!r}")
    needle_time = raw["needle_time"]
    if not isinstance(needle_time, list):
        raise _fail(source, index, "needle_time", f"expected a list of seconds, got {needle_time!r}")
    needle_time = tuple(_number(t, source, index, "needle_time") for t in needle_time)
    length = _number(raw["length"], source, index, "length")
    return Record(
        video=raw["video"], question=raw["question"], options=options, gt=gt,
        gt_option=raw["gt_option"], label=raw["type"], try_index=int(try_index),
        needle_time=needle_time, length=length,
        subtask=subtask_from_video(raw["video"]) or raw["type"],
    )


def load_annotations(path: str | Path) -> list[Record]:
    """Load and validate a VNBench-schema annotation file (a JSON list of records)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found; `duokit data fetch annotations` writes "
                                "VNBench's, `duokit synth --out DIR` writes DIR/annotations.json")
    raw = read_json(path)
    if not isinstance(raw, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    return [parse_record(item, index, str(path)) for index, item in enumerate(raw)]


def label_disagreements(records: list[Record]) -> dict[tuple[str, str], int]:
    """Count (published type, sub-task from file name) pairs that differ, e.g. the I-1/I-2 swap."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for record in records:
        if record.label != record.subtask:
            counts[(record.label, record.subtask)] += 1
    return dict(counts)


@dataclass(frozen=True)
class Sample:
    """The tries of one question about one video (4 in VNBench), ordered by try index."""

    sample_id: str
    video_name: str
    subtask: str
    question: str
    tries: tuple[Record, ...]

    @property
    def needle_time(self) -> tuple[float, ...]:
        return self.tries[0].needle_time


def group_samples(records: list[Record]) -> list[Sample]:
    """Group tries by video (one question per video in VNBench), in first-seen order.

    Raises if a sample repeats a try or if its tries disagree on sub-task, question, option set or
    correct option value; a sample may have fewer than 4 tries (a partial run or subset).
    """
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.sample_id, []).append(record)
    samples = []
    for sample_id, tries in groups.items():
        tries = sorted(tries, key=lambda r: r.try_index)
        indices = [r.try_index for r in tries]
        if len(set(indices)) != len(indices):
            raise AnnotationError(f"sample {sample_id}: try indices repeat: {indices}")
        first = tries[0]
        for record in tries[1:]:
            for field in ("subtask", "question", "gt"):
                if getattr(record, field) != getattr(first, field):
                    raise AnnotationError(
                        f"sample {sample_id}: try {record.try_index} has {field} "
                        f"{getattr(record, field)!r}, try {first.try_index} has {getattr(first, field)!r}")
            if set(record.options) != set(first.options):
                raise AnnotationError(
                    f"sample {sample_id}: try {record.try_index} has a different option set "
                    f"({list(record.options)} vs {list(first.options)})")
        samples.append(Sample(sample_id, first.video_name, first.subtask, first.question, tuple(tries)))
    return samples


def stratified_subset(samples: list[Sample], per_task: int, seed: int = 0) -> list[Sample]:
    """`per_task` samples of each sub-task, drawn with a seeded RNG, kept in the input order."""
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    by_task: dict[str, list[int]] = defaultdict(list)
    for position, sample in enumerate(samples):
        by_task[sample.subtask].append(position)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for subtask in sorted(by_task):
        positions = by_task[subtask]
        chosen.update(rng.sample(positions, min(per_task, len(positions))))
    return [samples[p] for p in sorted(chosen)]


# Where the videos of an annotation file are, for the errors that name a wrong folder.
VIDEO_FOLDERS = ("the folder holding the annotation file's videos: VNBench's, unpacked by `duokit data fetch "
                 "videos`, or DIR/videos of `duokit synth --out DIR`")


def resolve_video(video_name: str, video_dir: str | Path) -> Path:
    """The local file of a record's video: its basename under `video_dir` (docs/data.md)."""
    path = Path(video_dir) / PurePosixPath(video_name.replace("\\", "/")).name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video not found; the videos folder must be {VIDEO_FOLDERS}")
    return path
