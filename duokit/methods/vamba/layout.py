"""Which keys a prefix token sees under `vamba`, as pure functions of the token layout (no model, no cache).

The video span of a prefix runs from its first video token of a temporal group (`Prefix.frame_of` >= 0)
to its last video token. It is cut into chunks of `chunk_frames` temporal groups: chunk k ends after the
last token of its last group, and the next chunk starts right there, so text inside the span (Qwen3-VL's
timestamps and frame markers) belongs to the chunk of the group that follows it; a video token after the
last group (LLaVA-OneVision's newline) belongs to the last chunk. A token of chunk k sees the keys

    [0, sink_end)   the system prefix before the video and the first `sinks` tokens of the video span,
    [start_k, p]    its own chunk, causally,

where sink_end = first video token + sinks. Every other prefix token (text before and after the video)
sees all earlier keys, as does the text appended later (question, answer). A chunk that starts at or
before sink_end therefore sees all earlier keys too (chunk 0 always does): its rows are "global".

Everything is described by one vector over the prefix, `local_start`: start_k for a token of a chunk
that starts after sink_end, -1 for a token that sees every earlier key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def local_starts(frame_of: torch.Tensor, video_mask: torch.Tensor, chunk_frames: int | None,
                 sinks: int) -> tuple[torch.Tensor, int]:
    """(`local_start` (L,) long, sink_end) of a prefix (module docstring); sink_end is 0 without video."""
    length = frame_of.shape[0]
    local = torch.full((length,), -1, dtype=torch.long)
    grouped = (frame_of >= 0).nonzero()[:, 0].cpu()
    if len(grouped) == 0:
        return local, 0
    first = int(grouped[0])
    sink_end = first + sinks
    if chunk_frames is None:
        return local, sink_end
    chunk_of = frame_of[grouped].cpu() // chunk_frames
    # The last grouped token of each chunk, in order; chunk k spans (end of chunk k-1, end of chunk k].
    last = grouped[torch.cat([chunk_of[1:] != chunk_of[:-1], torch.tensor([True])])]
    span_end = max(int(last[-1]) + 1, int(video_mask.nonzero()[:, 0].max()) + 1)
    ends = [*(int(p) + 1 for p in last[:-1]), span_end]
    for start, end in zip([first, *ends[:-1]], ends):
        if start > sink_end:
            local[start:end] = start
    return local, sink_end


def piece_bounds(local_start: torch.Tensor, chunk_size: int) -> list[int]:
    """Prefill call ends: runs of equal `local_start` (one visibility per call), each cut every
    `chunk_size` tokens from the run's start. A prefix with one run gets the plain chunked bounds."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    changes = ((local_start[1:] != local_start[:-1]).nonzero()[:, 0] + 1).tolist()
    bounds = []
    for start, end in zip([0, *changes], [*changes, len(local_start)]):
        bounds += [*range(start + chunk_size, end, chunk_size), end]
    return bounds


def group_sizes(video_grids: Sequence[tuple[int, int, int]]) -> list[int]:
    """Tokens of each temporal group, in order: a grid (t, h, w) is t groups of h*w tokens."""
    return [h * w for t, h, w in video_grids for _ in range(t)]


def skipped_pairs(sizes: Sequence[int], chunk_frames: int | None, sinks: int, trailing: int = 0) -> int:
    """(query, key) pairs of causal attention a contiguous video span of groups of `sizes` tokens (and
    `trailing` more video tokens after the last group, in the last chunk) does not compute under vamba:
    a query of a chunk starting at offset s > sinks skips the keys at offsets sinks … s-1."""
    if chunk_frames is None:
        return 0
    skipped, offset = 0, 0
    for first in range(0, len(sizes), chunk_frames):
        tokens = sum(sizes[first:first + chunk_frames])
        if first + chunk_frames >= len(sizes):
            tokens += trailing
        skipped += tokens * max(0, offset - sinks)
        offset += tokens
    return skipped
