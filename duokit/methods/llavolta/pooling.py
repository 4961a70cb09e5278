"""LLaVolta's visual context compressor as pure functions of the token layout (no model, no cache).

The compressor (LLaVolta, arXiv 2406.20092; `visual_avg_pool1d` in `llava/model/language_model/
llava_llama.py` of the official code) average-pools the visual tokens with kernel = stride = s along
token order. Here the pool runs within each temporal group of the video (a Qwen-VL group of 2 frames
in raster order over its merged h x w grid, a LLaVA-OneVision frame): pooled token k of a group of n
tokens averages tokens k·s … min(k·s + s, n) − 1 of it, so a last group smaller than s (n not a
multiple of s) is pooled on its own (AvgPool1d would drop it). Text tokens, and video tokens outside
every group, stay as they are. Everything below is described by one vector, the *assignment*: for
each token the index of the pooled token it goes into, increasing along the sequence.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

POSITION_MODES = ("mean", "floor")


def pool_assignment(frame_of: torch.Tensor, stride: int) -> torch.Tensor:
    """`(L,)` long: the pooled token each token goes into. `frame_of` is `Prefix.frame_of` (temporal group
    per token, -1 = not pooled); a group is a run of equal `frame_of` values."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    index = torch.arange(len(frame_of), device=frame_of.device)
    run_start = torch.ones_like(frame_of, dtype=torch.bool)
    run_start[1:] = frame_of[1:] != frame_of[:-1]
    # Offset of each token within its run: index minus the index of the run's first token.
    first = torch.where(run_start, index, torch.zeros_like(index)).cummax(0).values
    starts_pooled_token = (frame_of < 0) | ((index - first) % stride == 0)
    return starts_pooled_token.long().cumsum(0) - 1


def pool_rows(states: torch.Tensor, assignment: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of the rows of `states` along `dim` that share a pooled token (a token pooled alone is copied)."""
    count = int(assignment[-1]) + 1
    shape = list(states.shape)
    shape[dim] = count
    sums = states.new_zeros(shape).index_add_(dim, assignment, states)
    sizes = torch.bincount(assignment, minlength=count).to(sums.dtype)
    view = [1] * states.dim()
    view[dim] = count
    return sums / sizes.view(view)


def pool_positions(position_ids: torch.Tensor, assignment: torch.Tensor, mode: str) -> torch.Tensor:
    """Position ids (`(3, 1, L)` M-RoPE or `(1, L)`) pooled component-wise: the members' mean as float32
    (`mean`), or rounded down to an integer (`floor`, the official code's cast of the mean to int)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {mode!r}")
    # float32 is exact for the integer sums here (< 2^24) and the mean of at most s integers is never
    # within rounding of the next integer, so `floor` rounds the exact mean down.
    pooled = pool_rows(position_ids.float(), assignment, dim=position_ids.dim() - 1)
    return pooled.floor().long() if mode == "floor" else pooled


def aligned_bounds(assignment: torch.Tensor, chunk_size: int) -> list[int]:
    """Prefill chunk ends (the last = L) at most `chunk_size` apart, moved back so no pooled token is split
    between two chunks; a chunk shorter than one pooled token's members ends after them instead."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    length = len(assignment)
    # A chunk may end before token i iff token i starts a new pooled token.
    cuts = ((assignment[1:] != assignment[:-1]).nonzero()[:, 0] + 1).tolist() + [length]
    bounds, start = [], 0
    while start < length:
        below = bisect.bisect_right(cuts, start + chunk_size) - 1  # the last cut within chunk_size
        end = cuts[below] if cuts[below] > start else cuts[bisect.bisect_right(cuts, start)]
        bounds.append(end)
        start = end
    return bounds


def pooled_length(num_tokens: int, video_groups: Sequence[int], stride: int) -> int:
    """Tokens left after pooling `num_tokens` tokens of which `video_groups` (token counts per temporal
    group) are pooled: each group of n becomes ceil(n / s)."""
    return num_tokens - sum(video_groups) + sum(-(-n // stride) for n in video_groups)
