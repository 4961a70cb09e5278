"""The synthesizer: haystacks x sub-tasks -> in-memory samples (frames + QA), each from its own seed.

As in VNBench every haystack is used once in each sub-task (the published annotations). Every random stream is
seeded by `split_seed(split, seed, ...)`, so the same config gives the same frames and records, and the
train and eval splits share no seed (splits.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from duokit.data.synth.haystack import Haystack, HaystackFolder, procedural_haystack
from duokit.data.synth.images import NeedleImages
from duokit.data.synth.splits import SPLITS, split_seed
from duokit.data.synth.tasks import BUILDERS, EDIT_NEEDLES, SynthSample, TaskInputs
from duokit.data.video import NEEDLE_SECONDS
from duokit.data.vnbench import SUBTASKS

# Gap between two needles of one video, so that a repeated word or class reads as two occurrences.
GAP_SECONDS = 0.5


@dataclass(frozen=True)
class SynthConfig:
    tasks: tuple[str, ...] = SUBTASKS
    per_task: int | None = 10  # haystacks, each used once per task; None: every video of the folder's split
    seconds: tuple[float, float] = (30.0, 30.0)  # procedural length range; a cap for user videos
    fps: float = 8.0
    size: tuple[int, int] = (320, 240)  # width, height
    seed: int = 0
    needle_seconds: float = NEEDLE_SECONDS
    split: str = "eval"
    haystacks: str | None = None  # folder of videos; None: procedural haystacks
    needle_images: str | None = None  # folder with one sub-folder of images per class

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in SUBTASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown or no sub-tasks {unknown}; choose from {list(SUBTASKS)}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        low, high = self.seconds
        if not 0 < low <= high:
            raise ValueError(f"seconds must be a range 0 < min <= max, got {self.seconds}")
        if not self.fps > 0 or not self.needle_seconds > 0:
            raise ValueError(f"fps and needle_seconds must be positive, got {self.fps}, {self.needle_seconds}")
        width, height = self.size
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise ValueError(f"size must be even and at least 16x16 (H.264 needs even sides), got {width}x{height}")
        if self.per_task is not None and self.per_task < 1:
            raise ValueError(f"per_task must be >= 1, got {self.per_task}")
        shortest = max(1, round(low * self.fps))
        if self.haystacks is None and shortest < self.frames_needed():
            # Needles and gaps scale with fps too, so only a longer video or shorter needles help.
            raise ValueError(f"{low:g} s at {self.fps:g} fps is {shortest} frames, but the sub-tasks "
                             f"{list(self.tasks)} need {self.frames_needed()} for their needles of "
                             f"{self.needle_frames} frames with {self.gap_frames}-frame gaps; raise --seconds "
                             f"to at least {self.frames_needed() / self.fps:g} or shorten --needle-seconds")

    @property
    def needle_frames(self) -> int:
        return max(1, round(self.needle_seconds * self.fps))

    @property
    def gap_frames(self) -> int:
        return max(1, round(GAP_SECONDS * self.fps))

    def frames_needed(self) -> int:
        """Haystack frames that the edit needles of the chosen sub-tasks need (inserts add their own)."""
        edits = [EDIT_NEEDLES[t] for t in self.tasks if t in EDIT_NEEDLES]
        count = max(edits, default=1)
        return count * self.needle_frames + (count - 1) * self.gap_frames

    def to_json(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks), "seconds": list(self.seconds), "size": list(self.size)}


class Synthesizer:
    """Generates the samples of one config, in order: haystack by haystack, then sub-task by sub-task."""

    def __init__(self, config: SynthConfig):
        self.config = config
        self.images = NeedleImages(config.needle_images, config.split)
        self.folder = HaystackFolder(config.haystacks, config.split) if config.haystacks else None
        if self.folder is None and config.per_task is None:
            raise ValueError("per_task=None (every video) needs a haystack folder; give per_task for procedural")
        if self.folder is not None:
            available = len(self.folder.videos)
            if config.per_task is not None and config.per_task > available:
                raise ValueError(f"{config.haystacks}: {available} videos fall in the {config.split} split but "
                                 f"per_task={config.per_task}; ask for at most {available} or add videos")

    @property
    def num_haystacks(self) -> int:
        if self.folder is not None and self.config.per_task is None:
            return len(self.folder.videos)
        return self.config.per_task

    def __len__(self) -> int:
        return self.num_haystacks * len(self.config.tasks)

    def check(self) -> None:
        """Fail before writing anything if a haystack video cannot be decoded."""
        if self.folder is not None:
            self.folder.check_readable()

    def haystack(self, index: int) -> Haystack:
        config = self.config
        if self.folder is not None:
            return self.folder.load(self.folder.videos[index], config.fps, config.size, config.seconds[1])
        seconds = np.random.default_rng(split_seed(config.split, config.seed, "haystack-seconds", index)).uniform(
            *config.seconds)
        haystack_id = f"proc-{config.split}{config.seed}-{index:04d}"
        return procedural_haystack(haystack_id, split_seed(config.split, config.seed, "haystack", index),
                                   float(seconds), config.fps, config.size)

    def sample_seed(self, haystack: Haystack, subtask: str) -> int:
        return split_seed(self.config.split, self.config.seed, "sample", haystack.haystack_id, subtask)

    def build(self, haystack: Haystack, subtask: str) -> SynthSample:
        config = self.config
        inputs = TaskInputs(haystack, np.random.default_rng(self.sample_seed(haystack, subtask)), self.images,
                            config.needle_frames, config.gap_frames)
        try:
            return BUILDERS[subtask](inputs)
        except ValueError as err:
            raise ValueError(f"haystack {haystack.source} ({len(haystack.frames)} frames at {haystack.fps:g} fps), "
                             f"sub-task {subtask}: {err}") from err

    def __iter__(self) -> Iterator[SynthSample]:
        for index in range(self.num_haystacks):
            haystack = self.haystack(index)
            for subtask in self.config.tasks:
                yield self.build(haystack, subtask)

    def manifest_entry(self, sample: SynthSample) -> dict:
        return {"sample_id": sample.sample_id, "subtask": sample.subtask,
                "seed": self.sample_seed(sample.haystack, sample.subtask),
                "haystack": {"id": sample.haystack.haystack_id, "source": sample.haystack.source},
                "needles": [needle.get("instance", needle["item"]) for needle in sample.needles]}

    def manifest(self, entries: list[dict]) -> dict:
        return {"generator": "duokit.data.synth", "split": self.config.split, "seed": self.config.seed,
                "config": self.config.to_json(), "samples": entries}
