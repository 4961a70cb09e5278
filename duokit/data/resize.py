"""Resize sampled video frames to one fixed size before a model's processor sees them.

A model trained on one frame size (NeedleNet: 56x56, docs/needlenet.md) reads every other size in that
same form: each frame is resized to exactly (width, height), aspect ratio not kept. Stretching keeps the
full height for a 4:3 or 16:9 frame, where a letterbox would shrink the subtitle needles (6% of the
frame height, docs/synth.md "Subtitles") by another 25-44%; the model is trained on stretched frames of those
shapes, so it sees at inference what it saw in training. Bilinear with antialiasing (an area average
when shrinking), in torch on CPU: the same frames give the same bytes on every run.
"""

from __future__ import annotations

import numpy as np
import torch


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] resized to [T, height, width, 3]; returned as is if already that size."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_frames: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"resize_frames: size must be positive, got {width}x{height}")
    if frames.shape[1:3] == (height, width):
        return frames
    # torch wants a writable array; a read-only one (e.g. a shared haystack) is copied
    pixels = frames if frames.flags.writeable and frames.flags.c_contiguous else np.array(frames, order="C")
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True,
                                              align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
