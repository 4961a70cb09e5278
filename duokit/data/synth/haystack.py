"""Haystacks: procedural videos drawn in code, or a folder of user videos resampled to a target fps/size.

A procedural haystack mixes a textured background seen through a panning camera, scene cuts, a slow
colour drift, bouncing shapes of any colour (grey and white included) and per-frame noise, so neither a
subtitle's grey box nor an inserted full-frame picture is given away by one pixel statistic (brightness,
a grey level, a hard cut, a noise-free frame); the noise level is kept so needle pixels get the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from duokit.data.synth.splits import split_of_file
from duokit.data.video import VideoError, load_frames

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


class HaystackError(ValueError):
    """A haystack folder or video that cannot be used."""


@dataclass(frozen=True)
class Haystack:
    haystack_id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    source: str  # "procedural:<seed>" or the video file
    noise_level: int  # amplitude of the uniform per-pixel noise in the frames (0 for user videos)


def add_noise(frames: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
    """uint8 frames plus uniform integer noise in [-level, level], clipped (a new array)."""
    if level == 0:
        return frames.copy()
    noise = rng.integers(-level, level + 1, size=frames.shape, dtype=np.int16)
    return np.clip(frames.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _texture_canvas(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 [height, width, 3] background: a base colour plus random plane waves per channel."""
    y, x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    canvas = np.broadcast_to(rng.uniform(30, 220, size=3).astype(np.float32), (height, width, 3)).copy()
    for _ in range(int(rng.integers(2, 6))):
        wavelength = rng.uniform(0.15, 1.0) * max(height, width)
        angle = rng.uniform(0, np.pi)
        phase = (np.cos(angle) * x + np.sin(angle) * y) * (2 * np.pi / wavelength) + rng.uniform(0, 2 * np.pi)
        wave = np.sin(phase) if rng.random() < 0.7 else np.sign(np.sin(phase))  # smooth or hard stripes
        canvas += wave[..., None] * rng.uniform(-40, 40, size=3).astype(np.float32)
    return canvas


def procedural_frames(seed: int, num_frames: int, height: int, width: int) -> tuple[np.ndarray, int]:
    """Frames uint8 [num_frames, height, width, 3] and their noise level, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    pad_y, pad_x = height // 2, width // 2
    cuts = np.sort(rng.choice(np.arange(1, num_frames), size=min(int(rng.integers(0, 3)), num_frames - 1),
                              replace=False))
    frames = np.empty((num_frames, height, width, 3), np.float32)
    for scene_start, scene_end in zip([0, *cuts], [*cuts, num_frames]):
        canvas = _texture_canvas(rng, height + pad_y, width + pad_x)
        start, end = rng.uniform(0, 1, size=2), rng.uniform(0, 1, size=2)  # camera pan across the canvas
        for t in range(scene_start, scene_end):
            w = (t - scene_start) / max(1, scene_end - scene_start - 1)
            oy, ox = ((1 - w) * start + w * end) * (pad_y, pad_x)
            frames[t] = canvas[int(oy):int(oy) + height, int(ox):int(ox) + width]
    times = np.arange(num_frames, dtype=np.float32)[:, None, None, None]
    period = rng.uniform(0.5, 2.0) * num_frames
    frames += rng.uniform(10, 35, size=3).astype(np.float32) * np.sin(
        2 * np.pi * times / period + rng.uniform(0, 2 * np.pi, size=3).astype(np.float32))
    _draw_moving_shapes(rng, frames)
    noise_level = int(rng.integers(2, 9))
    frames += rng.integers(-noise_level, noise_level + 1, size=frames.shape, dtype=np.int8)
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8), noise_level


def _draw_moving_shapes(rng: np.random.Generator, frames: np.ndarray) -> None:
    """Bouncing discs and boxes, each with its own colour, size and velocity (in place)."""
    num_frames, height, width = frames.shape[:3]
    side = min(height, width)
    for _ in range(int(rng.integers(3, 8))):
        radius = rng.uniform(0.04, 0.15) * side
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        position = rng.uniform([radius, radius], [height - radius, width - radius])
        velocity = rng.uniform(-0.03, 0.03, size=2) * side  # pixels per frame
        is_disc = rng.random() < 0.5
        for t in range(num_frames):
            y0, y1 = int(max(0, position[0] - radius)), int(min(height, position[0] + radius + 1))
            x0, x1 = int(max(0, position[1] - radius)), int(min(width, position[1] + radius + 1))
            if is_disc:
                yy, xx = np.ogrid[y0:y1, x0:x1]
                inside = (yy - position[0]) ** 2 + (xx - position[1]) ** 2 <= radius ** 2
                frames[t, y0:y1, x0:x1][inside] = colour
            else:
                frames[t, y0:y1, x0:x1] = colour
            position += velocity
            for axis, limit in ((0, height), (1, width)):
                if not radius <= position[axis] <= limit - radius:
                    velocity[axis] = -velocity[axis]
                    position[axis] = np.clip(position[axis], radius, limit - radius)


def procedural_haystack(haystack_id: str, seed: int, seconds: float, fps: float, size: tuple[int, int]) -> Haystack:
    width, height = size
    frames, noise_level = procedural_frames(seed, max(1, round(seconds * fps)), height, width)
    return Haystack(haystack_id, frames, fps, f"procedural:{seed}", noise_level)


def fit_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop frames to the aspect of `size` (width, height), then resize to it."""
    width, height = size
    source_height, source_width = frames.shape[1:3]
    if (source_width, source_height) == (width, height):
        return frames
    crop_width = min(source_width, round(source_height * width / height))
    crop_height = min(source_height, round(source_width * height / width))
    top, left = (source_height - crop_height) // 2, (source_width - crop_width) // 2
    return np.stack([
        np.asarray(Image.fromarray(frame[top:top + crop_height, left:left + crop_width]).resize(
            (width, height), Image.BILINEAR))
        for frame in frames])


class HaystackFolder:
    """The videos of one folder (not recursive) that belong to `split`, checked before any is used."""

    def __init__(self, root: str | Path, split: str = "eval"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise HaystackError(f"{self.root}: haystack folder not found; give a folder of videos "
                                f"({', '.join(VIDEO_EXTENSIONS)}) or use --procedural")
        videos = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not videos:
            raise HaystackError(f"{self.root}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in this folder; "
                                "add haystack videos or use --procedural")
        self.videos = [p for p in videos if split_of_file(p.name) == split]
        if not self.videos:
            raise HaystackError(f"{self.root}: none of its {len(videos)} videos falls in the {split} split "
                                "(videos are split train/eval by a hash of the file name); add more videos")
        ids = [haystack_id_of(p) for p in self.videos]
        if len(set(ids)) != len(ids):
            raise HaystackError(f"{self.root}: two videos share a name stem ({sorted(ids)}); rename one")

    def check_readable(self) -> None:
        """Decode one frame of every video, so a broken file stops the run before anything is written."""
        for path in self.videos:
            try:
                load_frames(path, num_frames=1)
            except VideoError as err:
                raise HaystackError(f"{path}: unreadable haystack video ({err}); remove it from {self.root} "
                                    "or re-encode it") from err

    def load(self, path: Path, fps: float, size: tuple[int, int], max_seconds: float | None) -> Haystack:
        """The video at `fps` (nearest earlier frame when its own rate is lower), cropped and resized."""
        try:
            try:
                video = load_frames(path, fps=fps)
                frames = video.frames
            except ValueError:  # more fps than the video has (or unreadable: the retry raises again)
                video = load_frames(path)
                count = max(1, int(video.duration * fps))
                frames = video.frames[np.minimum((np.arange(count) / fps * video.fps).astype(int),
                                                 len(video.frames) - 1)]
        except VideoError as err:
            raise HaystackError(f"{path}: unreadable haystack video ({err}); remove it from {self.root} "
                                "or re-encode it") from err
        if max_seconds is not None:
            frames = frames[:max(1, round(max_seconds * fps))]
        return Haystack(haystack_id_of(path), fit_frames(frames, size), fps, str(path), 0)


def haystack_id_of(path: Path) -> str:
    """A file-name-safe haystack id from the video's stem (the `<haystack>` of `<haystack>_<subtask>.mp4`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem)
