"""Recognition pre-training: teach NeedleNet's vision tower to name a needle before the language model
has to find one.

Real VLMs align their vision tower to the language model on captioned images before any video QA (the
projector stage of LLaVA-style training). NeedleNet's equivalent: one 2-frame group (the vision tower's
temporal patch) showing a needle — a fruit, landmark or object picture, or a subtitle "The secret word
is X." — or only haystack, and every merged video token of the group is trained to point at the
embedding of the needle's answer word (X, "apple", "Eiffel Tower", ...; haystack-only groups at the
`<|video_pad|>` embedding, a row the language model never reads otherwise). The logits are the
tokens times the (tied) embedding matrix, so after this stage a video token already *is*, to the
language model, roughly the word it must answer — what is left for the video QA stage is finding it.

Groups are drawn like the synthesizer draws needles (split "train", procedural haystacks and
pictures, the subtitle layout of needles.py, the haystack's own noise level), and the needle shows on
both frames of the group or on one (the other frame is haystack), as uniform sampling shows it.
"""

from __future__ import annotations

import numpy as np
import torch

from duokit.data.resize import resize_frames
from duokit.data.synth.haystack import add_noise, procedural_frames
from duokit.data.synth.images import NeedleImages
from duokit.data.synth.needles import subtitle_patch
from duokit.data.synth.pools import POOLS
from duokit.data.synth.splits import split_seed
from duokit.data.synth.tasks import SUBTITLE
from duokit.models.needlenet.config import FRAME_SIZE
from duokit.models.needlenet.data import pick_size

# What a group shows, and how often: subtitles (learned slowest in the probe, and the needle of three
# sub-tasks) get the most practice, then the large landmark pool.
KINDS = {"name": 0.4, "fruit": 0.1, "landmark": 0.25, "object": 0.15, "haystack": 0.1}
BACKGROUND_TOKEN = "<|video_pad|>"
LOGIT_SCALE = 8.0  # cosine-similarity temperature; 8 learned fastest of {dot product, separate head, 8}


def make_group(seed: int, index: int, sizes: tuple[str, ...] = (f"{FRAME_SIZE}x{FRAME_SIZE}",)) -> tuple[np.ndarray, str]:
    """Group `index` of the stream `seed`: uint8 frames [2, FRAME_SIZE, FRAME_SIZE, 3] and the word they
    show. A subtitle needle is set at one of `sizes` ("WxH", a `duokit synth --size`) and the group resized
    to FRAME_SIZE as `frame_fit` resizes such a video: a 7 px font at 160x120, shrunk, is another pixel
    pattern than the 3 px font of a 56x56 video. For that the FRAME_SIZE haystack is scaled up (nearest
    neighbour: drawing it at 640x360 costs ~40x more), the subtitle painted at the size, and the whole
    scaled back. Pictures fill the frame and scale with it, so they are drawn at FRAME_SIZE."""
    frames, _, word = make_pair(seed, index, sizes, native=False)
    return frames, word


def make_pair(seed: int, index: int, sizes: tuple[str, ...], native: bool = True) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(group `index` as make_group draws it, the same group with its subtitle set at FRAME_SIZE -- what a
    56x56 video shows -- or None if `native` is False, the word)."""
    rng = np.random.default_rng(split_seed("train", seed, "needlenet-recognition", index))
    kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
    haystack_seed = split_seed("train", seed, "needlenet-recognition-haystack", index)
    frames, noise_level = procedural_frames(haystack_seed, 2, FRAME_SIZE, FRAME_SIZE)
    if kind == "haystack":
        return frames, frames if native else None, BACKGROUND_TOKEN
    shown = [[0, 1], [0], [1]][int(rng.integers(3))]  # both frames of the group, or one of them
    name = str(rng.choice(POOLS[kind]))
    if kind == "name":
        width, height = pick_size(sizes, "train", seed, "needlenet-recognition-size", index)
        same = native and (width, height) != (FRAME_SIZE, FRAME_SIZE)
        reference = _paint_subtitle(frames, shown, name, FRAME_SIZE, FRAME_SIZE, _clone(rng), noise_level) if same else None
        frames = _paint_subtitle(frames, shown, name, width, height, rng, noise_level)
        return frames, (reference if same else frames) if native else None, name
    picture = NeedleImages(split="train").pick(kind, name, rng).frame(FRAME_SIZE, FRAME_SIZE)
    frames[shown] = add_noise(np.broadcast_to(picture, (len(shown), *picture.shape)), rng, noise_level)
    return frames, frames if native else None, name


def _clone(rng: np.random.Generator) -> np.random.Generator:
    copy = np.random.default_rng()
    copy.bit_generator.state = rng.bit_generator.state
    return copy


def _paint_subtitle(frames: np.ndarray, shown: list[int], name: str, width: int, height: int,
                    rng: np.random.Generator, noise_level: int) -> np.ndarray:
    """`frames` (FRAME_SIZE, not changed) with the subtitle of `name` on frames `shown`, set at width x height."""
    canvas = scale_nearest(frames, width, height)
    painted = canvas[shown]  # a copy (fancy indexing): paint it, then put it back
    subtitle_patch(SUBTITLE.format(name=name), height, width).apply(painted, rng, noise_level)
    canvas[shown] = painted
    return resize_frames(canvas, FRAME_SIZE, FRAME_SIZE)


def scale_nearest(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] scaled to [T, height, width, 3] by nearest neighbour (a new array)."""
    rows = np.arange(height) * frames.shape[1] // height
    cols = np.arange(width) * frames.shape[2] // width
    return frames[:, rows[:, None], cols[None, :]]


def kind_of(word: str) -> str:
    """The pool a group's word comes from ("haystack" for the background token)."""
    return next((pool for pool, names in POOLS.items() if word in names), "haystack")


class RecognitionBatches(torch.utils.data.Dataset):
    """Batch of recognition step `first_step + i`: (patches, grid [groups, 3], word ids, pools)."""

    def __init__(self, builder, seed: int, batch_size: int, first_step: int, steps: int,
                 sizes: tuple[str, ...] = (f"{FRAME_SIZE}x{FRAME_SIZE}",), first_size_share: float = 1 / 3,
                 pairs: bool = False):
        self.builder, self.seed, self.batch_size, self.pairs = builder, seed, batch_size, pairs
        self.first_step, self.steps, self.sizes = first_step, steps, tuple(sizes)
        self.first_size_steps = int(steps * first_size_share)

    def __len__(self) -> int:
        return self.steps - self.first_step

    def __getitem__(self, i: int):
        step = self.first_step + i
        first = step * self.batch_size
        sizes = sizes_at(self.sizes, step, self.first_size_steps)
        groups = [make_pair(self.seed, first + k, sizes, native=self.pairs) for k in range(self.batch_size)]
        pixels, grid = self.builder.pixels(np.stack([frames for frames, _, _ in groups]))
        words = [word for _, _, word in groups]
        ids = torch.tensor(self.builder.tokenizer.convert_tokens_to_ids(words))
        batch = [pixels, torch.tensor([grid] * len(groups)), ids, [kind_of(word) for word in words]]
        if self.pairs:  # + the same groups with their subtitles at FRAME_SIZE (the teacher's input)
            batch.append(self.builder.pixels(np.stack([native for _, native, _ in groups]))[0])
        return tuple(batch)


def sizes_at(sizes: tuple[str, ...], step: int, first_size_steps: int) -> tuple[str, ...]:
    """Sizes drawn from at recognition `step`: the first size alone for `first_size_steps` steps (by default
    the first third, TrainSettings.recognition_first_size_share), then all.
    Names learned at five sizes at once stayed at 9% train accuracy where one size reached 76%
    (docs/needlenet.md), so the 26 patterns of the first size are learned before the others join."""
    return sizes[:1] if step < first_size_steps else sizes


def teacher_loss(model, teacher, pixels: torch.Tensor, native: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """[groups]: mean squared distance of the vision tower's tokens for a group from the frozen `teacher`
    tower's tokens for the same group as a 56x56 video shows it. A trained NeedleNet's language model
    reads those tokens; matching them teaches the tower other frame sizes without changing what it reads."""
    tokens = model.model.visual(pixels, grid_thw=grid).pooler_output
    with torch.no_grad():
        target = teacher(native, grid_thw=grid).pooler_output
    return (tokens - target).pow(2).reshape(len(grid), -1).mean(-1)


def word_logits(model, pixels: torch.Tensor, grid: torch.Tensor, train_embeddings: bool = True) -> torch.Tensor:
    """[groups, tokens per group, vocab]: each merged video token against every word embedding, as
    cosine similarity times LOGIT_SCALE (plain dot products learned ~2x slower in a measured probe)."""
    tokens = model.model.visual(pixels, grid_thw=grid).pooler_output
    tokens = torch.nn.functional.normalize(tokens.reshape(len(grid), -1, tokens.shape[-1]), dim=-1)
    embeddings = model.get_input_embeddings().weight
    words = torch.nn.functional.normalize(embeddings if train_embeddings else embeddings.detach(), dim=-1)
    return LOGIT_SCALE * tokens @ words.T
