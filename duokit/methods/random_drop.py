"""`random_drop`: keep a seeded random share of the video tokens before the language model (a control).

Random token dropping is a strong baseline in visual-token pruning benchmarks (e.g. Wen et al., "Token
Pruning in Multimodal Large Language Models: Are We Solving the Right Problem?", arXiv:2502.11501): a
method that selects tokens must beat it at the same budget. The kept tokens keep their positions (M-RoPE
or 1-D) and their order; text tokens are never dropped; every layer holds the same shorter sequence.

Which tokens survive is drawn per sample from `seed` and a checksum of the sample's frames, so two
samples do not share one fixed pattern and a rerun draws the same tokens.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duokit.methods.base import Method, register_method


def kept_video_tokens(video: int, keep: float) -> int:
    """How many of `video` tokens a share `keep` keeps (at least one of a non-empty video while keep > 0)."""
    kept = round(keep * video)
    return max(kept, 1) if video and keep > 0 else kept


@register_method
@dataclass
class RandomDrop(Method):
    """Settings: `keep` (share of video tokens kept, 0..1; 1 keeps all), `seed` (the draw)."""

    name = "random_drop"
    keep: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.keep, (int, float)) or not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"random_drop keep must be a share of the video tokens in [0, 1], got {self.keep!r}")

    def prepare_prefix(self, prefix: Any, sample: Any, lm: Any) -> Any:
        video = prefix.video_mask.nonzero().flatten().cpu()
        kept = kept_video_tokens(len(video), self.keep)
        if kept == len(video):
            return prefix
        frames = sample.frames
        checksum = 0 if frames is None else zlib.crc32(np.ascontiguousarray(frames[:, ::8, ::8]).tobytes())
        chosen = np.random.default_rng([self.seed, checksum]).choice(len(video), size=kept, replace=False)
        mask = ~prefix.video_mask.cpu().clone()
        mask[video[torch.from_numpy(np.sort(chosen))]] = True
        return prefix.keep(mask)

    def layer_tokens(self, geometry: Any, tokens: Any) -> list[int]:
        return [tokens.text + kept_video_tokens(tokens.video, self.keep)] * geometry.num_layers

    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        if not 0 < budget <= 1:
            raise ValueError(f"random_drop: budget must be in (0, 1], got {budget}")
        return {"keep": float(budget)}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        return {"keep": 1.0}
