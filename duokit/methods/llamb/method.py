"""`llamb`: VideoLLaMB's SceneTilling and a recurrent memory over segments, training-free, in the LM.

VideoLLaMB (arXiv 2409.01071; bigai-nlco/VideoLLaMB) splits a video into scenes (SceneTilling,
`segment.py`) and carries a fixed-size memory from segment to segment through a trained bridge; only
the last segment's bridged tokens reach the LLM. Without the trained bridge, the memory here lives in
the language model's KV cache (docs/methods/llamb.md):

- the system prefix (tokens before the first video token) is prefilled as usual and never evicted;
- the video is prefilled segment by segment, in order; each segment attends to the system prefix, the
  memory and itself;
- after each segment but the last, every layer keeps `memory_tokens` M of its memory + segment tokens:
  those receiving the most attention mass from the segment's last `PROBE_ROWS` tokens (`attention`,
  computed inside the attention call of the segment's last chunk: q·Kᵀ for those rows only), or M
  averages of contiguous runs of them (`pool`); nothing else of the segment stays;
- the last segment stays whole, and the text after the video, a try's suffix and the answer follow it.
So the cache never holds more than system + M + one segment (+ the text after the video), and the
question is answered from [system; memory; last segment; question].

Kept tokens keep their positions (keys are cached after RoPE); the text after the video continues at
the prefix's `next_position`, as without eviction. A segment end splits a prefill chunk only where
the memory evicts; when nothing is evicted (M at least the video) the chunks are the engine's and the
result is the baseline's, bit for bit (the conformance suite's identity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from duokit.methods.attention import causal_attention, select_attention
from duokit.methods.base import Method, register_method
from duokit.methods.llamb.memory import MemoryCache, attention_mass, pool_bins, top_by_mass
from duokit.methods.llamb.segment import (
    MAX_THRESHOLD_BOUNDARIES,
    sampled_frames,
    scene_boundaries,
    uniform_boundaries,
)
from duokit.models.base import mask_runs

ATTENTION = "duokit_llamb"
PROBE_ATTRIBUTE = "_duokit_llamb_probe"
PROBE_ROWS = 8  # the segment's last tokens whose attention ranks the memory candidates
SEGMENTATIONS = ("scene", "uniform")
SELECTIONS = ("attention", "pool")


class Probe:
    """What the attention function shares with the prefill: how many last query rows to probe in the
    current call (0: none), and the attention mass each layer's keys received from them."""

    def __init__(self) -> None:
        self.rows = 0
        self.mass: dict[int, torch.Tensor] = {}


def llamb_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention over the layer's cached keys (the baseline's call), probing the last rows when asked."""
    probe = getattr(module, PROBE_ATTRIBUTE)
    if probe.rows:
        rows = min(probe.rows, query.shape[-2])
        probe.mass[module.layer_idx] = attention_mass(query[..., -rows:, :], key,
                                                      module.scaling if scaling is None else scaling)
    return causal_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@dataclass(frozen=True)
class Plan:
    """Where a prefix's tokens go: `system` tokens before the video; per segment, the token runs
    [start, end) prefilled (all of its tokens, or its sampled frames' with `frames_per_segment`);
    `video_end`, the token after the last video token; `length`, the prefix length."""

    system: int
    segments: tuple[tuple[tuple[int, int], ...], ...]
    video_end: int
    length: int

    @property
    def sizes(self) -> list[int]:
        return [sum(end - start for start, end in runs) for runs in self.segments]


@register_method
@dataclass
class LLaMB(Method):
    """Settings: `segmentation` (`scene`: SceneTilling; `uniform`: equal segments, the control), `segments`
    k boundaries (the released projector's 3), `threshold` α (scene only: boundaries where depth >
    mean + α·std, at most 15, instead of top-k), `memory_tokens` M kept per layer after each segment,
    `memory_select` (`attention`: by attention mass from the segment's last tokens; `pool`: M averages),
    `frames_per_segment` (prefill at most this many of a segment's temporal groups, picked as the
    original's linspace; the original's 8), None = all."""

    name = "llamb"
    segmentation: str = "scene"
    segments: int = 3
    threshold: float | None = None
    memory_tokens: int = 32
    memory_select: str = "attention"
    frames_per_segment: int | None = None

    def __post_init__(self) -> None:
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"llamb segmentation must be one of {', '.join(SEGMENTATIONS)}, got {self.segmentation!r}")
        if self.memory_select not in SELECTIONS:
            raise ValueError(f"llamb memory_select must be one of {', '.join(SELECTIONS)}, got {self.memory_select!r}")
        if not isinstance(self.segments, int) or self.segments < 0:
            raise ValueError(f"llamb segments (boundaries) must be an integer >= 0, got {self.segments!r}")
        if not isinstance(self.memory_tokens, int) or self.memory_tokens < 0:
            raise ValueError(f"llamb memory_tokens must be an integer >= 0, got {self.memory_tokens!r}")
        if self.threshold is not None:
            if self.segmentation != "scene":
                raise ValueError("llamb threshold (depth-score boundaries) needs segmentation=scene; "
                                 "drop it for uniform")
            if not isinstance(self.threshold, (int, float)):
                raise ValueError(f"llamb threshold must be a number (alpha, e.g. 0.5), got {self.threshold!r}")
        if self.frames_per_segment is not None and (not isinstance(self.frames_per_segment, int)
                                                    or self.frames_per_segment < 1):
            raise ValueError(f"llamb frames_per_segment must be an integer >= 1 or none, got {self.frames_per_segment!r}")

    # --- run scope ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def install(self, model: Any, adapter: Any) -> Iterator[None]:
        if getattr(adapter.text_config, "use_sliding_window", False):
            raise ValueError("llamb assumes causal attention over the whole cache; this model uses sliding windows")
        self._probe = Probe()
        with select_attention(model, ATTENTION, llamb_attention, PROBE_ATTRIBUTE, lambda module: self._probe):
            yield

    # --- per sample --------------------------------------------------------------------------------
    def plan(self, prefix: Any) -> Plan:
        """The segments of `prefix` (a pure function of its embeddings and layout)."""
        length = prefix.num_tokens
        video = prefix.video_mask.nonzero()[:, 0]
        if len(video) == 0:
            return Plan(length, (), length, length)
        first, end = int(video[0]), int(video[-1]) + 1
        frame_of = prefix.frame_of[first:end].cpu()
        groups = torch.unique_consecutive(frame_of[frame_of >= 0])
        if len(groups) == 0:  # video tokens without a grid: one segment
            return Plan(first, (((first, end),),), end, length)
        starts = [first + int((frame_of == group).nonzero()[0, 0]) for group in groups]
        if self.segmentation == "scene":
            embeds = prefix.inputs_embeds[0, first:end].float()
            descriptors = torch.stack([embeds[(frame_of == group).to(embeds.device)].mean(0) for group in groups])
            ends = scene_boundaries(descriptors, self.segments, self.threshold)
        else:
            ends = uniform_boundaries(len(groups), self.segments)
        segments = []
        for index, (low, high) in enumerate(pairwise([-1, *ends])):
            start = first if index == 0 else starts[low + 1]
            stop = end if high == len(groups) - 1 else starts[high + 1]
            kept = {int(groups[i]) for i in sampled_frames(low + 1, high, self.frames_per_segment)}
            local = frame_of[start - first:stop - first]
            processed = (local < 0) | torch.isin(local, torch.tensor(sorted(kept)))
            segments.append(tuple((start + a, start + b) for a, b, on in mask_runs(processed) if on))
        return Plan(first, tuple(segments), end, length)

    def prepare_prefix(self, prefix: Any, sample: Any, lm: Any) -> Any:
        plan = self.plan(prefix)
        costs = {"llamb_segments": len(plan.segments), "llamb_largest_segment": max(plan.sizes, default=0),
                 "llamb_video_tokens_prefilled": sum(plan.sizes)}
        return replace(prefix, costs={**prefix.costs, **costs})

    def new_cache(self, lm: Any, prefix: Any) -> Any:
        return MemoryCache(lm.geometry.num_layers)

    def prefill(self, lm: Any, prefix: Any, cache: Any, chunk_size: int) -> Any:
        """Prefill segment by segment, evicting after each segment but the last (module docstring).

        After it, `self.kept_tokens[l]` holds the prefix index of each token layer l's cache holds, in
        cache order (-1 for a pooled memory token)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        plan = self.plan(prefix)
        layers = lm.geometry.num_layers
        kept = [torch.zeros(0, dtype=torch.long) for _ in range(layers)]
        memory = 0
        pieces = [((0, plan.system), False)]
        last = len(plan.segments) - 1
        for index, (runs, size) in enumerate(zip(plan.segments, plan.sizes, strict=True)):
            evicts = index < last and memory + size > self.memory_tokens
            pieces += [(run, evicts and run == runs[-1]) for run in runs]
            memory = self.memory_tokens if evicts else memory + size
        pieces.append(((plan.video_end, plan.length), False))
        for (start, end), evicts in _merge(pieces):
            tokens = torch.arange(start, end)
            for low, high in _chunks(start, end, chunk_size):
                self._probe.rows = PROBE_ROWS if evicts and high == end else 0
                lm.forward(cache, prefix.position_ids[..., low:high], inputs_embeds=prefix.inputs_embeds[:, low:high],
                           **lm.adapter.chunk_inputs(prefix, low, high))
            self._probe.rows = 0
            kept = [torch.cat([ids, tokens]) for ids in kept]
            if evicts:
                kept = self._evict(cache, plan.system, kept)
        self.kept_tokens = kept
        return cache

    def _evict(self, cache: Any, system: int, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reduce every layer's tokens after the system prefix to `memory_tokens` (its memory)."""
        mass, self._probe.mass = self._probe.mass, {}
        result = []
        for index, (layer, ids) in enumerate(zip(cache.layers, kept, strict=True)):
            candidates = layer.stored - system
            if self.memory_tokens == 0:
                layer.keep(system, torch.zeros(0, dtype=torch.long))
                result.append(ids[:system])
            elif self.memory_select == "attention":
                chosen = top_by_mass(mass[index][system:], self.memory_tokens).cpu()
                layer.keep(system, chosen)
                result.append(torch.cat([ids[:system], ids[system:][chosen]]))
            else:
                layer.pool(system, pool_bins(candidates, self.memory_tokens))
                result.append(torch.cat([ids[:system], torch.full((self.memory_tokens,), -1)]))
        return result

    # --- costs -------------------------------------------------------------------------------------
    def peak_tokens(self, plan: Plan, after: int) -> int:
        """Tokens each layer holds at the peak for `plan`, with `after` tokens appended after the prefix
        (a try's suffix and answer): the largest of system + memory + segment over the segments, and the
        final cache (system + memory + last segment + the text after the video + `after`)."""
        peak, memory = plan.system, 0
        for index, size in enumerate(plan.sizes):
            peak = max(peak, plan.system + memory + size)
            if index < len(plan.sizes) - 1:
                memory = min(self.memory_tokens, memory + size)
        final = plan.system + memory + (plan.sizes[-1] if plan.sizes else 0) + plan.length - plan.video_end + after
        return max(peak, final)

    def estimate_sample_kv_bytes(self, geometry: Any, tokens: Any, prefix: Any) -> int:
        after = tokens.text - (prefix.num_tokens - prefix.num_video_tokens)
        return self.kv_bytes_of_layers(geometry, [self.peak_tokens(self.plan(prefix), after)] * geometry.num_layers)

    def layer_tokens(self, geometry: Any, tokens: Any) -> list[int]:
        # Before the segments are known (the planner): a bound. A segment has at most T − k temporal
        # groups (each of the k others has at least one; threshold mode may find no boundary), at most
        # `frames_per_segment`, plus any video tokens outside the groups.
        groups = sorted((h * w for t, h, w in tokens.video_grids for _ in range(t)), reverse=True)
        if not groups:
            return [tokens.total] * geometry.num_layers
        others = 0 if self.threshold is not None else min(self.segments, len(groups) - 1)
        largest = len(groups) - others
        if self.frames_per_segment is not None:
            largest = min(largest, self.frames_per_segment)
        segment = sum(groups[:largest]) + tokens.video - sum(groups)
        return [tokens.text + min(tokens.video, self.memory_tokens + segment)] * geometry.num_layers

    # --- budgets -----------------------------------------------------------------------------------
    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        # The final cache holds memory + last segment: half of ρ·N_v each, so k + 1 ≈ 2/ρ segments
        # (ρ = 0.5: the released k = 3). Scene segments are uneven; the achieved budget is measured.
        if not 0 < budget <= 1:
            raise ValueError(f"llamb: budget must be in (0, 1], got {budget}")
        groups = sum(t for t, _, _ in tokens.video_grids)
        segments = max(1, round(2 / budget) - 1)
        if groups:
            segments = min(segments, groups - 1, MAX_THRESHOLD_BOUNDARIES)
        return {"segments": segments, "memory_tokens": max(1, round(budget * tokens.video / 2))}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # A memory as large as any tiny video keeps every token: nothing is evicted.
        return {"memory_tokens": 1 << 20}


def _merge(pieces: list[tuple[tuple[int, int], bool]]) -> list[tuple[tuple[int, int], bool]]:
    """Adjacent runs joined into one (so the chunks stay the engine's), except after an evicting run."""
    merged: list[tuple[tuple[int, int], bool]] = []
    for (start, end), evicts in pieces:
        if start == end:
            continue
        if merged and not merged[-1][1] and merged[-1][0][1] == start:
            merged[-1] = ((merged[-1][0][0], end), evicts)
        else:
            merged.append(((start, end), evicts))
    return merged


def _chunks(start: int, end: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) cut at the multiples of `chunk_size` (the engine's chunk grid over the prefix)."""
    cuts = [start, *range((start // chunk_size + 1) * chunk_size, end, chunk_size), end]
    return list(pairwise(cuts))
