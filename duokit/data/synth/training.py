"""The training variant for DuoAttention gates: DuoAttention's passkey recipe, made visual.

DuoAttention trains its gates on synthetic passkey retrieval: several passkeys at several depths of a
long context, the model asked to recall them all, the loss taken on the passkey tokens only. Here a
video carries several needles (subtitles "The 3rd secret word is Ivy." or inserted pictures) at depths
drawn from a 0.05-0.95 grid, on haystacks whose frame count comes from a grid; each sample has several
free-text questions, and every answer marks the character spans of its answer words, so a trainer can
map them to tokens (tokenizer offsets) and mask its loss to them. Samples are produced in memory,
one per index, so a training loop never encodes or decodes video.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from duokit.data.synth.haystack import Haystack, HaystackFolder, add_noise, procedural_haystack
from duokit.data.synth.images import NeedleImages
from duokit.data.synth.needles import insert_clips, subtitle_patch
from duokit.data.synth.pools import NAMES
from duokit.data.synth.splits import SPLITS, split_seed

# Needle depths as fractions of the video, the grid of DuoAttention's and NIAH's depth sweeps.
DEPTH_GRID = tuple(round(0.05 + 0.1 * k, 2) for k in range(10))  # 0.05, 0.15, ..., 0.95
KINDS = ("subtitle", "picture")
MAX_PLACEMENT_TRIES = 100


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class TrainingConfig:
    frame_counts: tuple[int, ...] = (32, 64, 128)  # grid of video lengths, in frames
    fps: float = 2.0
    size: tuple[int, int] = (64, 64)  # width, height
    needles: tuple[int, int] = (2, 5)  # needles per video, min and max
    depths: tuple[float, ...] = DEPTH_GRID
    # 2 frames = one temporal patch of Qwen2.5-VL (temporal_patch_size 2 in its preprocessor_config.json)
    needle_frames: int = 2
    kinds: tuple[str, ...] = KINDS  # needle kind of sample i: kinds[i % len(kinds)]
    seed: int = 0
    split: str = "train"
    haystacks: str | None = None  # folder of videos; None: procedural
    needle_images: str | None = None
    # None: a fresh procedural haystack per sample. N: N haystacks of the longest frame count, drawn once,
    # kept in memory (N x frames x H x W x 3 bytes) and reused as random time windows with random flips
    # and time reversal, which makes samples several times cheaper (benchmarks/synth_speed.py).
    haystack_pool: int | None = None

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.frame_counts or min(self.frame_counts) < 2:
            raise ValueError(f"frame_counts must be frame counts >= 2, got {self.frame_counts}")
        low, high = self.needles
        if not 1 <= low <= high <= len(self.depths):
            raise ValueError(f"needles must be 1 <= min <= max <= {len(self.depths)} depths, got {self.needles}")
        if not all(0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if unknown := [k for k in self.kinds if k not in KINDS] or not self.kinds:
            raise ValueError(f"kinds must be from {KINDS}, got {unknown or self.kinds}")
        if self.haystack_pool is not None and self.haystack_pool < 1:
            raise ValueError(f"haystack_pool must be >= 1 or None, got {self.haystack_pool}")
        if self.needle_frames < 1 or not self.fps > 0:
            raise ValueError(f"needle_frames and fps must be positive, got {self.needle_frames}, {self.fps}")

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_spans: tuple[tuple[int, int], ...]  # [start, end) character spans of the answer words in `answer`

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "answer_spans": [list(s) for s in self.answer_spans]}


@dataclass(frozen=True)
class TrainingSample:
    sample_id: str
    seed: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    kind: str
    depths: tuple[float, ...]
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) output frames, in time order
    needles: tuple[dict, ...]  # per needle: answer item, instance source for pictures
    qa: tuple[QA, ...]
    haystack: Haystack

    @property
    def needle_time(self) -> list[float]:
        return [round(start / self.fps, 4) for start, _ in self.needle_spans]

    def manifest_entry(self) -> dict:
        return {"sample_id": self.sample_id, "seed": self.seed,
                "haystack": {"id": self.haystack.haystack_id, "source": self.haystack.source},
                "needles": [needle.get("instance", needle["item"]) for needle in self.needles]}


def _answer(sentences: list[tuple[str, str]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Join (template with one {}, word) sentences; return the text and the span of each word in it."""
    text, spans = "", []
    for template, word in sentences:
        prefix, suffix = template.split("{}")
        text += (" " if text else "") + prefix
        spans.append((len(text), len(text) + len(word)))
        text += word + suffix
    return text, tuple(spans)


def _questions(kind: str, items: list[str]) -> tuple[QA, ...]:
    """One question per needle, then one asking for all of them in order (DuoAttention's recall-all)."""
    if kind == "subtitle":
        ask, say, ask_all = "What is the {} secret word?", "The {} secret word is {{}}.", "What are the secret words, in order?"
    else:
        ask, say, ask_all = "What is the {} picture?", "The {} picture is {{}}.", "What are the pictures, in order?"
    sentences = [(say.format(ordinal(k + 1)), item) for k, item in enumerate(items)]
    qa = [QA(ask.format(ordinal(k + 1)), *_answer([sentence])) for k, sentence in enumerate(sentences)]
    return (*qa, QA(ask_all, *_answer(sentences)))


class TrainingGenerator:
    """`sample(index)` is a pure function of (config, index): resumable, shuffle-free, parallel-safe."""

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.images = NeedleImages(config.needle_images, config.split)
        self.folder = HaystackFolder(config.haystacks, config.split) if config.haystacks else None
        self._loaded: dict = {}  # decoded user videos, or pooled procedural haystacks

    def _haystack(self, index: int, num_frames: int, rng: np.random.Generator) -> Haystack:
        config = self.config
        if self.folder is None and config.haystack_pool is None:
            return procedural_haystack(f"proc-{config.split}{config.seed}-{index:06d}",
                                       self._haystack_seed(index), num_frames / config.fps, config.fps, config.size)
        if self.folder is None:
            slot = int(rng.integers(config.haystack_pool))
            if slot not in self._loaded:
                longest = max(config.frame_counts)
                self._loaded[slot] = procedural_haystack(
                    f"pool-{config.split}{config.seed}-{slot:05d}", self._pool_seed(slot), longest / config.fps,
                    config.fps, config.size)
                self._loaded[slot].frames.setflags(write=False)  # shared by many samples
            pooled = self._loaded[slot]
            offset = int(rng.integers(len(pooled.frames) - num_frames + 1))  # a random window in time
            frames = pooled.frames[offset:offset + num_frames]
            frames = frames[:, :, ::-1] if rng.random() < 0.5 else frames  # horizontal flip
            frames = frames[::-1] if rng.random() < 0.5 else frames  # time reversal
            return Haystack(pooled.haystack_id, frames, config.fps, pooled.source, pooled.noise_level)
        path = self.folder.videos[int(rng.integers(len(self.folder.videos)))]
        if path not in self._loaded:
            self._loaded[path] = self.folder.load(path, config.fps, config.size, max_seconds=None)
        video = self._loaded[path]
        picks = np.linspace(0, len(video.frames) - 1, num_frames).round().astype(int)  # resampled to the grid length
        return Haystack(video.haystack_id, video.frames[picks], config.fps, video.source, video.noise_level)

    def _haystack_seed(self, index: int) -> int:
        return split_seed(self.config.split, self.config.seed, "training-haystack", index)

    def _pool_seed(self, slot: int) -> int:
        return split_seed(self.config.split, self.config.seed, "training-haystack-pool", slot)

    def _place(self, rng: np.random.Generator, count: int, slots: int, length: int) -> tuple[list[float], list[int]]:
        """`count` depths from the grid whose windows neither overlap nor touch; starts in [0, slots - length]."""
        for _ in range(MAX_PLACEMENT_TRIES):
            depths = sorted(float(d) for d in rng.choice(self.config.depths, size=count, replace=False))
            starts = [round(d * (slots - length)) for d in depths]
            if all(b - a > length for a, b in itertools.pairwise(starts)):
                return depths, starts
        raise ValueError(f"cannot place {count} needles of {length} frames apart in {slots} frames on the depth "
                         f"grid {self.config.depths}; use longer videos (frame_counts) or fewer needles")

    def sample(self, index: int) -> TrainingSample:
        config = self.config
        seed = split_seed(config.split, config.seed, "training-sample", index)
        rng = np.random.default_rng(seed)
        kind = config.kinds[index % len(config.kinds)]
        count = int(rng.integers(config.needles[0], config.needles[1] + 1))
        length = config.needle_frames
        # inserted pictures lengthen the video: start shorter so every video has a frame count of the grid
        num_frames = int(rng.choice(config.frame_counts)) - (count * length if kind == "picture" else 0)
        if num_frames < 2:
            raise ValueError(f"frame_counts {config.frame_counts} leave no haystack for {count} pictures of "
                             f"{length} frames; use longer videos or fewer needles")
        haystack = self._haystack(index, num_frames, rng)
        height, width = haystack.frames.shape[1:3]
        if kind == "subtitle":
            items = [NAMES[i] for i in rng.choice(len(NAMES), size=count, replace=False)]
            depths, starts = self._place(rng, count, len(haystack.frames), length)
            frames = haystack.frames.copy()
            for k, (start, item) in enumerate(zip(starts, items)):
                text = f"The {ordinal(k + 1)} secret word is {item}."
                subtitle_patch(text, height, width).apply(frames[start:start + length], rng, haystack.noise_level)
            needles = tuple({"kind": kind, "item": item} for item in items)
        else:
            classes = [("fruit", name) for name in self.images.classes("fruit")] + [
                ("object", name) for name in self.images.classes("object")]
            picked = [classes[i] for i in rng.choice(len(classes), size=count, replace=False)]
            items = [name for _, name in picked]
            depths, positions = self._place(rng, count, len(haystack.frames), 0)
            instances = [self.images.pick(pool, name, rng) for pool, name in picked]
            clips = [add_noise(np.broadcast_to(i.frame(height, width), (length, height, width, 3)), rng,
                               haystack.noise_level) for i in instances]
            frames, starts = insert_clips(haystack.frames, positions, clips)
            needles = tuple({"kind": kind, "item": name, "instance": i.source} for name, i in zip(items, instances))
        spans = tuple((s, s + length) for s in starts)
        return TrainingSample(f"{config.split}{config.seed}-{index:06d}", seed, frames, config.fps, kind, tuple(depths),
                              spans, needles, _questions(kind, items), haystack)

    def samples(self, count: int, start: int = 0):
        for index in range(start, start + count):
            yield self.sample(index)

    def _haystack_sources(self, start: int, count: int) -> list[str]:
        config = self.config
        if self.folder is not None:
            return [str(p) for p in self.folder.videos]
        if config.haystack_pool is not None:
            return [f"procedural:{self._pool_seed(slot)}" for slot in range(config.haystack_pool)]
        return [f"procedural:{self._haystack_seed(i)}" for i in range(start, start + count)]

    def manifest(self, count: int, start: int = 0) -> dict:
        """Seeds and sources of samples start..start+count-1, without drawing them (for a run's records)."""
        config = self.config
        return {
            "generator": "duokit.data.synth.training", "split": config.split, "seed": config.seed,
            "config": config.to_json(), "indices": [start, start + count],
            "sample_seeds": [split_seed(config.split, config.seed, "training-sample", i)
                             for i in range(start, start + count)],
            "haystacks": self._haystack_sources(start, count),
            "needle_images": {pool: {name: [str(p) for p in files] for name, files in classes.items()}
                              for pool, classes in self.images.files.items()} or "procedural",
        }

