"""FlexAttention's selection rule as pure functions of the attention rows and the video layout (no model).

FlexAttention (arXiv 2407.20228; `LlamaAttention.forward` of the official code's `modeling_llama.py`)
takes the selected query rows' attention over the low-resolution image tokens, summed over heads,
min-max normalises each row, thresholds it (`255·Â > τ`, τ = 48 in the paper), max-pools the binary
map into coarse cells (`AdaptiveMaxPool2d` to 9×9 of a 72×72 high-resolution grid, i.e. cells of 8×8
high-resolution tokens) and takes every high-resolution token of a selected cell. `special=random`
instead picks each cell with probability 0.1 (its ablation control).

Here the video is a sequence of temporal groups (a Qwen-VL group of 2 frames); each group's low-res
(h, w) grid and high-res (H, W) grid cover the same picture. High-res token (i, j) lies in cell
(i // cell, j // cell); a cell covers the low-res rows/columns its high-res tokens cover
(`cell_regions`), and a row selects the cell when any low-res token of that region passes the
threshold. Several query rows (the question's tokens) select the union of their cells. An optional
budget caps the selected high-res tokens at a fraction of all of them, keeping cells in order of their
attention mass (the mean summed attention over the cell's low-res region), or in random order for
the random control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from duokit.models.base import Grid

SELECTIONS = ("attention", "random")


def binary_rows(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """`(R, V)` bool: each row of `attention` min-max normalised over its V columns, above `threshold`
    (FlexAttention's 48/255). A constant row selects nothing."""
    low = attention.min(-1, keepdim=True).values
    span = attention.max(-1, keepdim=True).values - low
    normalised = (attention - low) / torch.where(span > 0, span, torch.ones_like(span))
    return (normalised > threshold) & (span > 0)


def cell_regions(low: tuple[int, int], high: tuple[int, int], cell: int) -> torch.Tensor:
    """`(cells, h*w)` bool: the low-res tokens each coarse cell covers, cells in raster order. Cell
    (a, b) holds high-res rows a·cell … min((a+1)·cell, H) − 1 (columns alike), which cover low-res rows
    floor(a·cell·h/H) … ceil(min((a+1)·cell, H)·h/H) − 1."""
    (h, w), (height, width) = low, high
    rows = [_span(a * cell, min((a + 1) * cell, height), h, height) for a in range(math.ceil(height / cell))]
    cols = [_span(b * cell, min((b + 1) * cell, width), w, width) for b in range(math.ceil(width / cell))]
    regions = torch.zeros(len(rows), len(cols), h, w, dtype=torch.bool)
    for a, (r0, r1) in enumerate(rows):
        for b, (c0, c1) in enumerate(cols):
            regions[a, b, r0:r1, c0:c1] = True
    return regions.reshape(len(rows) * len(cols), h * w)


def _span(first: int, end: int, low: int, high: int) -> tuple[int, int]:
    return first * low // high, -(-end * low // high)


def token_cells(high: tuple[int, int], cell: int) -> torch.Tensor:
    """`(H*W,)` long: the coarse cell of each high-res token, raster order."""
    height, width = high
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return ((rows // cell) * math.ceil(width / cell) + cols // cell).reshape(-1)


def select_tokens(attention: torch.Tensor | None, low_grids: Sequence[Grid], high_grids: Sequence[Grid], *,
                  threshold: float, cell: int, budget: float | None, selection: str, random_p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """`(N,)` bool over the N high-res video tokens (grid after grid, group after group, raster order):
    the ones to re-inject. `attention` `(R, V)`: the query rows' head-summed attention over the V low-res
    video tokens in the same order (unused by `random`, which draws from `generator`)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if len(low_grids) != len(high_grids):
        raise ValueError(f"{len(low_grids)} low-res videos for {len(high_grids)} high-res ones")
    chosen, masses, sizes = [], [], []
    used = 0
    binary = None if selection == "random" else binary_rows(attention, threshold)
    for (t, h, w), (t_high, height, width) in zip(low_grids, high_grids):
        if t != t_high:
            raise ValueError(f"low-res grid {(t, h, w)} and high-res grid {(t_high, height, width)} differ in "
                             "temporal groups; both resolutions must see the same frames")
        regions = cell_regions((h, w), (height, width), cell).float()  # (cells, h*w)
        cells = regions.shape[0]
        if selection == "random":
            chosen.append(torch.rand(t, cells, generator=generator) < random_p)
            masses.append(torch.rand(t, cells, generator=generator))  # random order under a budget
        else:
            rows = binary[:, used:used + t * h * w].reshape(-1, t, h * w).float()
            chosen.append(((rows @ regions.T) > 0).any(0))  # (t, cells): any row, any token of the region
            total = attention[:, used:used + t * h * w].sum(0).reshape(t, h * w)
            masses.append(total @ regions.T / regions.sum(1))
        sizes.append(torch.bincount(token_cells((height, width), cell), minlength=cells).expand(t, cells))
        used += t * h * w
    if binary is not None and used != binary.shape[1]:
        raise ValueError(f"the attention rows cover {binary.shape[1]} low-res video tokens, the grids {used}")
    picked = torch.cat([c.reshape(-1) for c in chosen])
    if budget is not None:
        picked = _cap(picked, torch.cat([m.reshape(-1) for m in masses]), torch.cat([s.reshape(-1) for s in sizes]),
                      budget)
    # Back from cells to tokens, grid by grid.
    tokens, start = [], 0
    for (t, _, _), (_, height, width) in zip(low_grids, high_grids):
        cells = math.ceil(height / cell) * math.ceil(width / cell)
        per_group = picked[start:start + t * cells].reshape(t, cells)
        tokens.append(per_group[:, token_cells((height, width), cell)].reshape(-1))
        start += t * cells
    return torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.bool)


def _cap(picked: torch.Tensor, mass: torch.Tensor, size: torch.Tensor, budget: float) -> torch.Tensor:
    """The picked cells, in order of decreasing mass, while their high-res tokens add up to at most
    floor(budget · all high-res tokens)."""
    limit = math.floor(budget * int(size.sum()))
    order = torch.argsort(torch.where(picked, mass, torch.full_like(mass, -math.inf)), descending=True, stable=True)
    within = (torch.cumsum(size[order] * picked[order], 0) <= limit) & picked[order]
    capped = torch.zeros_like(picked)
    capped[order[within]] = True
    return capped


def high_res_positions(low_positions: torch.Tensor, low_grids: Sequence[Grid], high_grids: Sequence[Grid]) -> torch.Tensor:
    """`(3, N)` float32 M-RoPE positions of the N high-res tokens, inside the low-res grid's range.

    `low_positions` `(3, V)`: the low-res video tokens' positions, in layout order. High-res token (i, j)
    of a group whose low-res token (0, 0) sits at (t, y, x) gets (t, y + (i + ½)·h/H − ½, x + (j + ½)·w/W
    − ½): its centre in low-res token units, the analogue of FlexAttention's bicubically interpolated
    RoPE tables (`set_hd_info`)."""
    out, used = [], 0
    for (t, h, w), (_, height, width) in zip(low_grids, high_grids):
        origin = low_positions[:, used:used + t * h * w].reshape(3, t, h * w)[:, :, 0].float()  # (3, t)
        rows = (torch.arange(height, dtype=torch.float32) + 0.5) * h / height - 0.5
        cols = (torch.arange(width, dtype=torch.float32) + 0.5) * w / width - 0.5
        offset = torch.stack([torch.zeros(height, width), rows[:, None].expand(height, width),
                              cols[None, :].expand(height, width)]).reshape(3, 1, height * width)
        out.append((origin[:, :, None] + offset.to(origin.device)).reshape(3, t * height * width))
        used += t * h * w
    return torch.cat(out, dim=1) if out else low_positions.new_zeros(3, 0, dtype=torch.float32)
