"""SceneTilling (VideoLLaMB, arXiv 2409.01071, §3.2) and the uniform control, as pure functions.

Faithful to `segment` / `cal_depth_score` in `llava/model/multimodal_projector/self_segment.py` of
bigai-nlco/VideoLLaMB: the cosine similarity s_t of neighbouring frame descriptors (t = 0 … T−2), a
depth score per gap climbing from s_t to the nearest local maximum on each side (ties keep climbing),
d_t = lpeak + rpeak − 2·s_t, and boundaries = the k deepest gaps (the projector's k = 3) or, in
threshold mode, every gap with d_t > mean(d) + α·std(d) (unbiased std, as `torch.std_mean`), at most
15 of them. A boundary t ends a segment with frame t; T−1 closes the last segment.

Where this differs from the original, and why:
- The descriptor of a frame is the mean of its temporal group's merged video tokens (the vision
  tower's output as the language model receives it): the original uses the LanguageBind CLS token,
  which Qwen-VL's ViT does not have.
- Ties in depth are broken towards the earlier gap (a stable sort); `torch.topk` leaves them unspecified.
- The original asserts T % 8 == 0 (so T ≥ 8 > k); here any T ≥ 1 is accepted and k is capped at the
  T − 1 gaps there are (T = 1: one segment).
"""

from __future__ import annotations

import torch

MAX_THRESHOLD_BOUNDARIES = 15  # the original's cap in threshold mode ("to prevent from OOM")


def depth_scores(similarity: torch.Tensor) -> torch.Tensor:
    """`cal_depth_score`: for each gap, climb left and right while the similarity does not decrease."""
    values = similarity.tolist()
    depth = []
    for index, here in enumerate(values):
        left = right = here
        for other in reversed(values[:index]):
            if other < left:
                break
            left = other
        for other in values[index + 1:]:
            if other < right:
                break
            right = other
        depth.append(left + right - 2 * here)
    return torch.tensor(depth, dtype=similarity.dtype)


def deepest(depth: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` largest depths, ascending; equal depths prefer the earlier gap."""
    order = torch.sort(depth, descending=True, stable=True).indices
    return sorted(order[:count].tolist())


def scene_boundaries(descriptors: torch.Tensor, segments: int = 3, threshold: float | None = None) -> list[int]:
    """Segment ends (frame indices, inclusive, ascending, the last = T−1) for `descriptors` (T, d).

    `segments` k boundaries by depth (top-k), or with `threshold` α the gaps deeper than mean + α·std."""
    frames = descriptors.shape[0]
    if frames == 0:
        raise ValueError("SceneTilling needs at least one frame descriptor")
    if frames == 1:
        return [0]
    features = descriptors.float()
    similarity = torch.cosine_similarity(features[:-1], features[1:], dim=-1)
    depth = depth_scores(similarity)
    if threshold is None:
        boundaries = deepest(depth, min(segments, frames - 1))
    elif frames == 2:  # one gap: the original's unbiased std is nan, so no gap passes the threshold
        boundaries = []
    else:
        std, mean = torch.std_mean(depth)
        boundaries = (depth > mean + threshold * std).nonzero()[:, 0].tolist()
        if len(boundaries) > MAX_THRESHOLD_BOUNDARIES:
            boundaries = deepest(depth, MAX_THRESHOLD_BOUNDARIES)
    if not boundaries or boundaries[-1] != frames - 1:
        boundaries.append(frames - 1)
    return boundaries


def uniform_boundaries(frames: int, segments: int = 3) -> list[int]:
    """Segment ends splitting `frames` into `segments` + 1 runs as equal as possible (the control)."""
    if frames < 1:
        raise ValueError("uniform segmentation needs at least one frame")
    parts = min(segments, frames - 1) + 1
    return [(index + 1) * frames // parts - 1 for index in range(parts)]


def sampled_frames(first: int, last: int, cap: int | None) -> list[int]:
    """Frames of the segment `first`…`last` that are processed: all, or with `cap` the original's
    `torch.linspace(first, last, min(cap, length), dtype=torch.int)` (8 in the released projector)."""
    length = last - first + 1
    if cap is None or length <= cap:
        return list(range(first, last + 1))
    return torch.linspace(first, last, cap, dtype=torch.int).tolist()
