"""The nine VNBench sub-tasks: needles, question, options and the four tries (VNBench annotations; docs/synth.md).

A builder takes a haystack and a seeded RNG and returns a `SynthSample`: the output frames, the QA of
try 0, and where every needle occurrence sits. `SynthSample.records` gives the four VNBench records.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from duokit.data.synth.haystack import Haystack, add_noise
from duokit.data.synth.images import NeedleImages
from duokit.data.synth.needles import insert_clips, sample_starts, sticker_patch, subtitle_patch
from duokit.data.synth.pools import NAMES, plural
from duokit.data.vnbench import LETTERS, permuted_options

# Questions verbatim from the VNBench annotations (huggingface.co/datasets/videoniah/VNBench).
QUESTIONS = {
    "ret_edit1": "What is the secret word?",
    "ret_insert1": "What kind of fruit appears in this video?",
    "ret_insert2": "What is the name of the landmark in the picture?",
    "ord_edit1": "What is the order of the secret words that appeared in the video?",
    "ord_insert1": "What is the order of fruits appearing in the video?",
    "ord_insert2": "What is the order of images appearing in the video?",
    "cnt_edit1": "How many secret words appeared in the video?",
    "cnt_edit2": "Some {plural} were inserted into 4 small sections of the video. "
                 "How many {plural} appeared in the video in total?",
    "cnt_insert1": "How many {plural} appeared in the video?",
}
SUBTITLE = "The secret word is {name}."
# Needle counts and option rules follow the published annotations; docs/synth.md ("How our needles differ from
# the official ones") lists them and every choice of ours.
ORDER_ITEMS = 4  # ordering needles: 4 distinct items
COUNT_RANGE = (1, 6)  # cnt_edit1 / cnt_insert1 occurrences and option values
SECTIONS = 4  # cnt_edit2: "4 small sections" (its question)
STICKERS_PER_SECTION = (1, 4)  # so the cnt_edit2 answer is 4-16
STICKER_GRID = (3, 4)  # rows, columns: one sticker per cell keeps stickers apart and countable
# Most needles an edit sub-task burns into the haystack's own frames.
EDIT_NEEDLES = {"ret_edit1": 1, "ord_edit1": ORDER_ITEMS, "cnt_edit1": COUNT_RANGE[1], "cnt_edit2": SECTIONS}
NEAR_SPREAD = 4  # cnt_edit2 options: 4 distinct ints within 4 of each other (as in the published options)


@dataclass(frozen=True)
class TaskInputs:
    haystack: Haystack
    rng: np.random.Generator
    images: NeedleImages
    needle_frames: int  # frames per needle occurrence
    gap_frames: int  # minimum haystack frames between two needles, so repeats stay countable


@dataclass(frozen=True)
class SynthSample:
    sample_id: str  # "<haystack>_<subtask>", the video's file stem
    subtask: str
    frames: np.ndarray  # uint8 [T, H, W, 3], the output video
    fps: float
    question: str
    options: tuple  # try-0 order; ints for counting, as in VNBench-main-4try.json
    gt: str | int
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) output frames of each needle occurrence, in time order
    needles: tuple[dict, ...]  # per occurrence: answer item, instance source, sticker boxes
    haystack: Haystack

    @property
    def needle_time(self) -> list[float]:
        return [round(start / self.fps, 4) for start, _ in self.needle_spans]

    @property
    def length(self) -> float:
        return round(len(self.frames) / self.fps, 4)

    def records(self, video: str) -> list[dict]:
        """The four tries in the VNBench schema, options permuted by the official scheme (`permuted_options`)."""
        records = []
        for try_index, options in enumerate(permuted_options(list(self.options))):
            records.append({
                "video": video, "question": self.question, "options": options, "gt": self.gt,
                "gt_option": LETTERS[options.index(self.gt)], "type": self.subtask, "try": try_index,
                "needle_time": self.needle_time, "length": self.length,
            })
        return records


def _shuffled(rng: np.random.Generator, items) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _choose(rng: np.random.Generator, pool, count: int) -> list:
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def retrieval_options(rng, gt: str, pool) -> list[str]:
    """gt and 3 distractors from the same pool, in random order (docs/synth.md, "Options")."""
    return _shuffled(rng, [gt, *_choose(rng, [item for item in pool if item != gt], 3)])


def order_options(rng, items: list[str]) -> list[str]:
    """The true order and 3 other orders of the same items, written "a, b, c, d" (docs/synth.md, "Options")."""
    others = [p for p in itertools.permutations(items) if list(p) != items]
    return _shuffled(rng, [", ".join(items), *(", ".join(p) for p in _choose(rng, others, 3))])


def count_options(rng, gt: int) -> list[int]:
    """4 distinct ints from 1-6 including gt (docs/synth.md, "Options")."""
    low, high = COUNT_RANGE
    return _shuffled(rng, [gt, *_choose(rng, [n for n in range(low, high + 1) if n != gt], 3)])


def near_count_options(rng, gt: int) -> list[int]:
    """4 distinct ints >= 1 around gt, all within NEAR_SPREAD of each other (docs/synth.md, "Options")."""
    low = int(rng.integers(max(1, gt - NEAR_SPREAD), gt + 1))  # the window [low, low + NEAR_SPREAD] holds gt
    window = [n for n in range(low, low + NEAR_SPREAD + 1) if n != gt]
    return _shuffled(rng, [gt, *_choose(rng, window, 3)])


def _subtitles(inputs: TaskInputs, names: list[str]):
    """Burn one subtitle per name into non-overlapping windows of existing frames."""
    haystack, rng, length = inputs.haystack, inputs.rng, inputs.needle_frames
    frames = haystack.frames.copy()
    starts = sample_starts(rng, len(frames), len(names), length, inputs.gap_frames)
    height, width = frames.shape[1:3]
    for start, name in zip(starts, names):
        subtitle_patch(SUBTITLE.format(name=name), height, width).apply(
            frames[start:start + length], rng, haystack.noise_level)
    spans = tuple((s, s + length) for s in starts)
    return frames, spans, tuple({"kind": "subtitle", "item": name} for name in names)


def _pictures(inputs: TaskInputs, pool: str, names: list[str]):
    """Insert one full-frame picture per name as new frames between haystack frames."""
    haystack, rng, length = inputs.haystack, inputs.rng, inputs.needle_frames
    height, width = haystack.frames.shape[1:3]
    positions = sample_starts(rng, len(haystack.frames), len(names), 0, inputs.gap_frames)
    instances = [inputs.images.pick(pool, name, rng) for name in names]
    clips = [add_noise(np.broadcast_to(instance.frame(height, width), (length, height, width, 3)), rng,
                       haystack.noise_level) for instance in instances]
    frames, starts = insert_clips(haystack.frames, positions, clips)
    spans = tuple((s, s + length) for s in starts)
    return frames, spans, tuple({"kind": "picture", "item": name, "instance": instance.source}
                                for name, instance in zip(names, instances))


def _sample(inputs: TaskInputs, subtask: str, built, question: str, options: list, gt) -> SynthSample:
    frames, spans, needles = built
    haystack = inputs.haystack
    return SynthSample(f"{haystack.haystack_id}_{subtask}", subtask, frames, haystack.fps, question,
                       tuple(options), gt, spans, needles, haystack)


def ret_edit1(inputs: TaskInputs) -> SynthSample:
    name = _choose(inputs.rng, NAMES, 1)[0]
    built = _subtitles(inputs, [name])
    return _sample(inputs, "ret_edit1", built, QUESTIONS["ret_edit1"], retrieval_options(inputs.rng, name, NAMES),
                   name)


def _retrieve_picture(inputs: TaskInputs, subtask: str, pool: str) -> SynthSample:
    classes = inputs.images.classes(pool)
    name = _choose(inputs.rng, classes, 1)[0]
    built = _pictures(inputs, pool, [name])
    return _sample(inputs, subtask, built, QUESTIONS[subtask], retrieval_options(inputs.rng, name, classes), name)


def ret_insert1(inputs: TaskInputs) -> SynthSample:
    return _retrieve_picture(inputs, "ret_insert1", "fruit")


def ret_insert2(inputs: TaskInputs) -> SynthSample:
    return _retrieve_picture(inputs, "ret_insert2", "landmark")


def ord_edit1(inputs: TaskInputs) -> SynthSample:
    names = _choose(inputs.rng, NAMES, ORDER_ITEMS)
    built = _subtitles(inputs, names)
    return _sample(inputs, "ord_edit1", built, QUESTIONS["ord_edit1"], order_options(inputs.rng, names),
                   ", ".join(names))


def _order_pictures(inputs: TaskInputs, subtask: str, pool: str) -> SynthSample:
    names = _choose(inputs.rng, inputs.images.classes(pool), ORDER_ITEMS)
    built = _pictures(inputs, pool, names)
    return _sample(inputs, subtask, built, QUESTIONS[subtask], order_options(inputs.rng, names), ", ".join(names))


def ord_insert1(inputs: TaskInputs) -> SynthSample:
    return _order_pictures(inputs, "ord_insert1", "fruit")


def ord_insert2(inputs: TaskInputs) -> SynthSample:
    return _order_pictures(inputs, "ord_insert2", "object")


def cnt_edit1(inputs: TaskInputs) -> SynthSample:
    count = int(inputs.rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    name = _choose(inputs.rng, NAMES, 1)[0]  # the same word repeated (docs/synth.md, "Timing")
    built = _subtitles(inputs, [name] * count)
    return _sample(inputs, "cnt_edit1", built, QUESTIONS["cnt_edit1"], count_options(inputs.rng, count), count)


def cnt_insert1(inputs: TaskInputs) -> SynthSample:
    count = int(inputs.rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    name = _choose(inputs.rng, inputs.images.classes("object"), 1)[0]
    built = _pictures(inputs, "object", [name] * count)  # a fresh instance per occurrence
    question = QUESTIONS["cnt_insert1"].format(plural=plural(name))
    return _sample(inputs, "cnt_insert1", built, question, count_options(inputs.rng, count), count)


def cnt_edit2(inputs: TaskInputs) -> SynthSample:
    """Stickers of one fruit pasted into 4 short sections, 1-4 per section at distinct grid cells."""
    haystack, rng, length = inputs.haystack, inputs.rng, inputs.needle_frames
    frames = haystack.frames.copy()
    height, width = frames.shape[1:3]
    name = _choose(rng, inputs.images.classes("fruit"), 1)[0]
    instance = inputs.images.pick("fruit", name, rng)
    rows, columns = STICKER_GRID
    cell_height, cell_width = height // rows, width // columns
    size = max(2, int(0.8 * min(cell_height, cell_width)))
    sticker = instance.sticker(size)
    starts = sample_starts(rng, len(frames), SECTIONS, length, inputs.gap_frames)
    needles = []
    for start in starts:
        count = int(rng.integers(STICKERS_PER_SECTION[0], STICKERS_PER_SECTION[1] + 1))
        boxes = []
        for cell in rng.choice(rows * columns, size=count, replace=False):
            top = int(cell // columns) * cell_height + int(rng.integers(0, cell_height - size + 1))
            left = int(cell % columns) * cell_width + int(rng.integers(0, cell_width - size + 1))
            patch = sticker_patch(sticker, top, left)
            patch.apply(frames[start:start + length], rng, haystack.noise_level)
            boxes.append(patch.box())
        needles.append({"kind": "stickers", "item": name, "instance": instance.source, "count": count,
                        "boxes": sorted(boxes)})
    total = sum(needle["count"] for needle in needles)
    spans = tuple((s, s + length) for s in starts)
    question = QUESTIONS["cnt_edit2"].format(plural=plural(name))
    return _sample(inputs, "cnt_edit2", (frames, spans, tuple(needles)), question,
                   near_count_options(rng, total), total)


BUILDERS: dict[str, Callable[[TaskInputs], SynthSample]] = {
    "ret_edit1": ret_edit1, "ret_insert1": ret_insert1, "ret_insert2": ret_insert2,
    "ord_edit1": ord_edit1, "ord_insert1": ord_insert1, "ord_insert2": ord_insert2,
    "cnt_edit1": cnt_edit1, "cnt_edit2": cnt_edit2, "cnt_insert1": cnt_insert1,
}
