"""Needles on a haystack: subtitles and stickers edited into frames, pictures inserted as new frames.

Layout of the subtitle (a third party's measurement of the official videos; docs/synth.md): white
text, font about 6% of the frame height, on an RGB(80, 80, 80) box whose bottom edge is at 85% of the
frame height, horizontally centred.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from duokit.data.synth.haystack import add_noise
from duokit.data.synth.images import composite

SUBTITLE_BOX_RGB = (80, 80, 80)
SUBTITLE_BOTTOM = 0.85  # box bottom edge, fraction of frame height
SUBTITLE_FONT = 0.06  # font size, fraction of frame height
SUBTITLE_MAX_WIDTH = 0.96  # a longer line is set in a smaller font so the box stays inside the frame


@dataclass(frozen=True)
class Patch:
    """Pixels to put on frames: `rgb` [h, w, 3] where `alpha` [h, w] (0..255) says, corner at (top, left)."""

    top: int
    left: int
    rgb: np.ndarray
    alpha: np.ndarray

    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom/right exclusive."""
        return self.top, self.left, self.top + self.rgb.shape[0], self.left + self.rgb.shape[1]

    def apply(self, frames: np.ndarray, rng: np.random.Generator, noise_level: int) -> None:
        """Paint the patch onto every frame of `frames` (in place), with fresh haystack-like noise."""
        top, left, bottom, right = self.box()
        rgba = np.dstack([self.rgb, self.alpha])
        for frame in frames:
            composite(frame, rgba, top, left)
            frame[top:bottom, left:right] = add_noise(frame[top:bottom, left:right], rng, noise_level)


@lru_cache(maxsize=256)
def subtitle_patch(text: str, height: int, width: int) -> Patch:
    """White `text` on the grey box, placed per the measured VNBench layout."""
    font_size = max(1, round(SUBTITLE_FONT * height))
    font = ImageFont.load_default(size=font_size)  # Pillow's built-in font: no download (Pillow >= 10.1)
    left, top, right, bottom = font.getbbox(text)
    if right - left > SUBTITLE_MAX_WIDTH * width:
        font_size = max(1, int(font_size * SUBTITLE_MAX_WIDTH * width / (right - left)))
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = max(1, round(0.4 * font_size)), max(1, round(0.25 * font_size))
    box_width = min(width, right - left + 2 * pad_x)
    box_height = bottom - top + 2 * pad_y
    image = Image.new("RGB", (box_width, box_height), SUBTITLE_BOX_RGB)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=(255, 255, 255), font=font)
    box_bottom = round(SUBTITLE_BOTTOM * height)
    rgb = np.asarray(image)
    rgb.setflags(write=False)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    return Patch(max(0, box_bottom - box_height), (width - box_width) // 2, rgb, alpha)


def sticker_patch(rgba: np.ndarray, top: int, left: int) -> Patch:
    return Patch(top, left, rgba[..., :3], rgba[..., 3])


def sample_starts(rng: np.random.Generator, total: int, count: int, length: int, gap: int) -> list[int]:
    """`count` sorted starts s in [0, total - length], each window [s, s+length) followed by >= `gap`
    free slots before the next; uniform over all valid placements ("stars and bars")."""
    free = total - count * length - (count - 1) * gap
    if free < 0:
        raise ValueError(f"cannot place {count} needles of {length} frames with {gap}-frame gaps in "
                         f"{total} frames; use a longer haystack (--seconds) or shorter needles (--needle-seconds)")
    picks = np.sort(rng.choice(free + count, size=count, replace=False))
    return [int(pick) - k + k * (length + gap) for k, pick in enumerate(picks)]


def insert_clips(frames: np.ndarray, positions: list[int], clips: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Insert `clips[k]` before haystack frame `positions[k]` (sorted); returns the video and each clip's
    first frame index in it."""
    pieces, starts, previous, inserted = [], [], 0, 0
    for position, clip in zip(positions, clips):
        pieces += [frames[previous:position], clip]
        starts.append(position + inserted)
        inserted += len(clip)
        previous = position
    pieces.append(frames[previous:])
    return np.concatenate(pieces), starts
