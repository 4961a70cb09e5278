"""NeedleNet training data: the synthesizer's VNBench-style samples, in memory, as model batches.

One example = one procedural haystack with its needles (duokit.data.synth, split "train", so no seed,
haystack or needle instance is shared with an eval set), `frames` frames sampled by the official
uniform rule (VNBench's official LLaVA example, github.com/joez17/VideoNIAH), the official prompt of one of its 4 tries, and the gt option's text as
the target answer. Examples are a pure function of (seed, frames, index): training is resumable and
reproducible without storing data.

Video length: a needle lasts NEEDLE_SECONDS (1.5 s = 3 frames at 2 fps); the haystack is sized so that
the stride between sampled frames is 1.5-3 video frames (inserted pictures included), so every needle
shows in at least one sampled frame. An eval set built with `eval_synth_config(frames)` has the same
property (docs/needlenet.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from duokit.data.resize import resize_frames
from duokit.data.synth.generate import GAP_SECONDS, SynthConfig, Synthesizer
from duokit.data.synth.splits import split_seed
from duokit.data.video import NEEDLE_SECONDS, sampled_fps, uniform_indices
from duokit.data.vnbench import SUBTASKS, official_prompt
from duokit.models.needlenet.config import FRAME_SIZE

FPS = 2.0  # haystack frame rate: a 1.5 s needle spans 3 frames
NEEDLE_FRAMES = round(NEEDLE_SECONDS * FPS)
GAP_FRAMES = max(1, round(GAP_SECONDS * FPS))  # the synthesizer's gap between two needles (generate.py)
# Video frames between two uniformly sampled frames, (min, max): at most NEEDLE_FRAMES, so every needle
# window holds a sampled frame; the official rule samples linspace(0, V - 1, N) (VNBench's official LLaVA example, github.com/joez17/VideoNIAH).
STRIDE = (1.5, 3.0)
RETRIEVAL = tuple(t for t in SUBTASKS if t.startswith("ret_"))
FAMILIES = ("ret", "ord", "cnt")  # sub-task name prefixes (vnbench.SUBTASKS)
MOST_NEEDLES = {"ord": 4, "cnt_edit1": 6, "cnt_insert1": 6, "cnt_edit2": 4}  # tasks.py ORDER_ITEMS etc.
# The earlier probe's first curriculum stage (docs/needlenet.md): 2 frames that both show the needle, so it
# fills the one temporal patch. Not the uniform rule: the synthesizer's shortest haystack plus an
# inserted picture is too long for 2 uniformly sampled frames to see it.
NEEDLE_STAGE = 2
IGNORE = -100  # label of positions without loss (transformers' cross-entropy ignore_index)


def most_needles(subtask: str) -> int:
    return MOST_NEEDLES.get(subtask, MOST_NEEDLES.get(subtask[:3], 1))


def inserted_frames(subtask: str) -> int:
    """Frames an insert sub-task adds to the haystack (at most): one needle clip per picture."""
    return most_needles(subtask) * NEEDLE_FRAMES if "insert" in subtask else 0


def needed_frames(subtask: str) -> int:
    """Fewest haystack frames that hold the sub-task's needles with their gaps (needles.sample_starts)."""
    count = most_needles(subtask)
    if "insert" in subtask:  # pictures add their own frames, but SynthConfig asks for one needle's worth
        return max(NEEDLE_FRAMES, (count - 1) * GAP_FRAMES)
    return count * NEEDLE_FRAMES + (count - 1) * GAP_FRAMES


def haystack_frames(frames: int, subtask: str, stride: tuple[float, float] = STRIDE) -> tuple[int, int] | None:
    """(min, max) haystack frames for which `frames` sampled frames, `stride` (min, max) video frames
    apart, see every needle; None if none does."""
    low, high = (round(step * (frames - 1)) + 1 - inserted_frames(subtask) for step in stride)
    low = max(low, needed_frames(subtask))
    return (low, high) if low <= high else None


def tasks_for(frames: int) -> tuple[str, ...]:
    """Sub-tasks whose needles all fit, each seen, in a video sampled to `frames` frames."""
    if frames == NEEDLE_STAGE:
        return RETRIEVAL
    return tuple(t for t in SUBTASKS if haystack_frames(frames, t) is not None)


def weighted_tasks(frames: int, family_weights: tuple[int, int, int]) -> tuple[str, ...]:
    """`tasks_for(frames)` with each sub-task repeated by its family's weight (retrieval, ordering,
    counting): an example draws uniformly from this tuple. Weights (1, 1, 1) give `tasks_for(frames)`."""
    weight = dict(zip(FAMILIES, family_weights))
    return tuple(task for task in tasks_for(frames) for _ in range(weight[task[:3]]))


def synth_config(frames: int, subtask: str, seed: int, split: str, size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE),
                 stride: tuple[float, float] = STRIDE) -> SynthConfig:
    low, high = haystack_frames(max(frames, 2 * NEEDLE_STAGE), subtask, stride)
    return SynthConfig(tasks=(subtask,), per_task=1, seconds=(low / FPS, high / FPS), fps=FPS,
                       size=size, seed=seed, split=split)


def eval_synth_config(frames: int, per_task: int, seed: int, tasks: tuple[str, ...] = SUBTASKS) -> SynthConfig:
    """A held-out set (split "eval") of `tasks` in one haystack length range that suits each of them at
    `frames` sampled frames (`duokit synth --seconds LOW-HIGH --fps 2 --size 56x56`)."""
    ranges = [haystack_frames(frames, task) for task in tasks]
    if None in ranges:
        raise ValueError(f"{frames} frames cannot show every needle of {list(tasks)}; use more frames "
                         f"(all nine sub-tasks need >= 16)")
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return SynthConfig(tasks=tuple(tasks), per_task=per_task, seconds=(low / FPS, high / FPS), fps=FPS,
                       size=(FRAME_SIZE, FRAME_SIZE), seed=seed, split="eval")


@dataclass(frozen=True)
class Example:
    subtask: str
    frames: np.ndarray  # uint8 [frames, H, W, 3], uniformly sampled
    fps: float  # frames per video second of the sampled frames (what the engine passes)
    prompt: str  # the official prompt of one try
    answer: str  # the gt option's text
    options: tuple[str, ...]


def sampled(frames: np.ndarray, fps: float, count: int) -> tuple[np.ndarray, float]:
    """`count` frames by the official uniform rule, and their fps as the engine computes it."""
    indices = uniform_indices(len(frames), count)
    return frames[indices], sampled_fps(indices / fps, fps)


@cache
def _synthesizer(frames: int, subtask: str, seed: int, split: str, size: tuple[int, int],
                 stride: tuple[float, float]) -> Synthesizer:
    return Synthesizer(synth_config(frames, subtask, seed, split, size, stride))


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height), even sides >= 16 as `duokit synth --size` takes them."""
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"frame size {text!r} is not WxH (e.g. 160x120)") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"frame size {text!r}: sides must be even and >= 16 (duokit synth --size)")
    return width, height


def pick_size(sizes: tuple[str, ...], *key) -> tuple[int, int]:
    """One of `sizes` ("WxH", repeats weight it) for the draw `key`; a single size draws nothing, so the
    one-size stream is the same as before sizes existed."""
    if len(sizes) == 1:
        return parse_size(sizes[0])
    return parse_size(sizes[int(np.random.default_rng(split_seed(*key)).integers(len(sizes)))])


def make_example(seed: int, frames: int, index: int, tasks: tuple[str, ...] | None = None,
                 split: str = "train", sizes: tuple[str, ...] = (f"{FRAME_SIZE}x{FRAME_SIZE}",),
                 stride: tuple[float, float] = STRIDE) -> Example:
    """Example `index` of the stream (seed, frames): a random sub-task of `tasks`, a random try. The
    video is synthesized at one of `sizes` and its sampled frames resized to FRAME_SIZE as the model's
    `frame_fit` resizes them at inference (duokit/data/resize.py); `stride` bounds the video frames
    between two sampled frames (smaller = denser sampling)."""
    tasks = tasks or tasks_for(frames)
    rng = np.random.default_rng(split_seed(split, seed, "needlenet-example", frames, index))
    subtask = tasks[int(rng.integers(len(tasks)))]
    size = pick_size(sizes, split, seed, "needlenet-example-size", frames, index)
    synthesizer = _synthesizer(frames, subtask, seed, split, size, tuple(stride))
    # Haystack ids carry (frames, index), so every example of every stage has its own haystack seed.
    sample = synthesizer.build(synthesizer.haystack(frames * 10**7 + index), subtask)
    record = sample.records("")[int(rng.integers(4))]
    options = tuple(str(option) for option in record["options"])
    if frames == NEEDLE_STAGE:
        start, end = sample.needle_spans[0]
        first = start + int(rng.integers(end - start - 1))
        video, fps = sample.frames[first:first + 2], sample.fps
    else:
        video, fps = sampled(sample.frames, sample.fps, frames)
    video = resize_frames(video, FRAME_SIZE, FRAME_SIZE)
    return Example(subtask, video, fps, official_prompt(record["question"], options), str(record["gt"]), options)


class BatchBuilder:
    """Model inputs for a batch of examples, built as the real processor builds them (checked in
    tests/test_needlenet.py): the processor's own rescale/normalise and patchify on the stacked frames
    (4x faster than calling the processor per video, measured in an earlier probe), token ids from the chat
    template with one <|video_pad|> per video token, right padding, loss on the answer + <|im_end|>."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.video_processor = processor.video_processor
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def prompt_ids(self, prompt: str, video_tokens: int) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        at = ids.index(self.video_token_id)
        return ids[:at] + [self.video_token_id] * video_tokens + ids[at + 1:]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def pixels(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """`frames` uint8 [B, T, H, W, 3] -> (pixel_values_videos [B * patches, dim], grid [t, h, w])."""
        vp = self.video_processor
        videos = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 1, 4, 2, 3).float()
        videos = vp.rescale_and_normalize(videos, True, vp.rescale_factor, True, vp.image_mean, vp.image_std)
        patches, grid_t, grid_h, grid_w = vp.patchify(videos, vp.patch_size, vp.merge_size, vp.temporal_patch_size)
        return patches.reshape(-1, patches.shape[-1]), [grid_t, grid_h, grid_w]

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        sizes = {example.frames.shape for example in examples}
        if len(sizes) != 1:
            raise ValueError(f"a batch needs one frame count and size, got {sorted(sizes)}")
        pixel_values, grid = self.pixels(np.stack([example.frames for example in examples]))
        video_tokens = grid[0] * grid[1] * grid[2] // self.video_processor.merge_size ** 2
        rows, labels = [], []
        for example in examples:
            prompt, answer = self.prompt_ids(example.prompt, video_tokens), self.answer_ids(example.answer)
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "labels": torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels]),
            "mm_token_type_ids": (input_ids == self.video_token_id).long() * 2,  # 2 = video (transformers' Qwen-VL `mm_token_type_ids`)
            "pixel_values_videos": pixel_values,
            "video_grid_thw": torch.tensor([grid] * len(examples)),
            "second_per_grid_ts": torch.tensor(
                [self.video_processor.temporal_patch_size / example.fps for example in examples]),
        }
