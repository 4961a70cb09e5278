"""`vamba`: text-global / video-local attention — a training-free proxy of Vamba's cost structure.

Vamba (Ren et al., arXiv 2503.11579; github.com/TIGER-AI-Lab/Vamba) keeps the video tokens out of the
LLM's causal self-attention: text reads the video through cross-attention at every layer, the video
tokens are updated by Mamba-2 blocks (linear in their number), and they never pass the LLM's MLPs. Here,
on any supported VLM as released:

- video tokens attend causally only within their chunk of `chunk_frames` temporal groups, plus the
  system prefix and the first `sinks` tokens of the video (`layout.py`) — the stand-in for the Mamba
  scan, linear in the number of frames;
- text tokens (the prompt around the video, the question, the answer) attend to every video token at
  every layer, as Vamba's cross-attention does; the KV cache stays full;
- optionally (`skip_mlp_from`), from that decoder layer on the video tokens skip the MLP.

The method owns the prefill: one call per run of tokens with the same visible keys (cut every
`chunk_size` tokens), each call's plan passed as a language-model keyword (`attention.py`). At
`chunk_frames` >= the number of temporal groups (or None) and no MLP skip, every call is global and the
chunks are the baseline's: the baseline's tokens and logits, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duokit.methods.attention import select_attention
from duokit.methods.base import Method, causal_pairs, register_method, score_flops
from duokit.methods.vamba.attention import ATTENTION_NAME, PLAN_KWARG, ChunkPlan, MlpSkip, vamba_attention
from duokit.methods.vamba.layout import group_sizes, local_starts, piece_bounds, skipped_pairs


@register_method
@dataclass
class Vamba(Method):
    """Settings: `chunk_frames` c (temporal groups per chunk — a Qwen-VL group is 2 frames, a
    LLaVA-OneVision group 1 frame; None = one chunk, the whole video), `sinks` (first tokens of the video
    every chunk sees), `skip_mlp_from` (decoder layer from which video tokens skip the MLP; None = never)."""

    name = "vamba"
    chunk_frames: int | None = 8
    sinks: int = 0
    skip_mlp_from: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_frames is not None and (not isinstance(self.chunk_frames, int) or self.chunk_frames < 1):
            raise ValueError(f"vamba chunk_frames must be an integer >= 1 (temporal groups per chunk) or None "
                             f"(the whole video), got {self.chunk_frames!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"vamba sinks must be an integer >= 0, got {self.sinks!r}")
        if self.skip_mlp_from is not None and (not isinstance(self.skip_mlp_from, int) or self.skip_mlp_from < 0):
            raise ValueError(f"vamba skip_mlp_from must be a decoder layer index >= 0 or None (never skip), "
                             f"got {self.skip_mlp_from!r}")

    @contextlib.contextmanager
    def install(self, model: Any, adapter: Any) -> Iterator[None]:
        layers = adapter.decoder_layers
        if self.skip_mlp_from is not None and self.skip_mlp_from >= len(layers):
            raise ValueError(f"vamba skip_mlp_from {self.skip_mlp_from} is not below the model's {len(layers)} "
                             f"layers; use 0 to {len(layers) - 1}, or none")
        if getattr(adapter.text_config, "use_sliding_window", False):
            raise ValueError("vamba assumes causal attention over the whole prefix; this model uses sliding windows")
        skip, handles = MlpSkip(), []
        if self.skip_mlp_from is not None:
            for layer in layers[self.skip_mlp_from:]:
                handles += [layer.register_forward_pre_hook(skip.layer_hook, with_kwargs=True),
                            layer.mlp.register_forward_pre_hook(skip.mlp_pre_hook),
                            layer.mlp.register_forward_hook(skip.mlp_hook)]
        try:
            with select_attention(model, ATTENTION_NAME, vamba_attention, modules=[layer.self_attn for layer in layers]):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def prefill(self, lm: Any, prefix: Any, cache: Any, chunk_size: int) -> Any:
        local, sink_end = local_starts(prefix.frame_of, prefix.video_mask, self.chunk_frames, self.sinks)
        skip_rows = self.skip_mlp_from is not None

        def chunk_kwargs(start: int, end: int) -> dict[str, ChunkPlan]:
            rows = prefix.video_mask[start:end] if skip_rows else None
            if rows is None and local[start] < 0:
                return {}  # a global call without MLP skipping: the baseline's call
            return {PLAN_KWARG: ChunkPlan(sink_end, int(local[start]), rows)}

        return lm.prefill(prefix, cache, chunk_size, bounds=piece_bounds(local, chunk_size),
                          chunk_kwargs=chunk_kwargs)

    def estimate_prefill_flops(self, geometry: Any, tokens_per_layer: Sequence[int],
                               tokens: Any = None) -> dict[str, int]:
        # The baseline's count, less the (query, key) pairs the chunks skip and the video rows' MLP in the
        # skipping layers. The skipped pairs assume a contiguous video span laid out by `tokens.video_grids`
        # (Qwen2/2.5-VL, LLaVA-OneVision); Qwen3-VL's timestamp text inside the span is not counted in it.
        if tokens is None:
            raise ValueError("vamba: the prefill FLOPs depend on the video layout; pass the TokenCounts (`tokens`)")
        costs = super().estimate_prefill_flops(geometry, tokens_per_layer, tokens)
        sizes = group_sizes(tokens.video_grids)
        skipped = skipped_pairs(sizes, self.chunk_frames, self.sinks, tokens.video - sum(sizes))
        costs["attention_flops"] -= len(tokens_per_layer) * score_flops(geometry.num_heads, geometry.head_dim,
                                                                        skipped)
        if self.skip_mlp_from is not None:
            skipping = len(tokens_per_layer) - min(self.skip_mlp_from, len(tokens_per_layer))
            costs["mlp_flops"] -= skipping * 2 * 3 * tokens.video * geometry.hidden_size * geometry.intermediate_size
        return costs

    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        # vamba keeps the whole KV cache; its budget is the fraction ρ of the video→video (query, key) pairs
        # of the prefill's attention it computes (sinks 0): the c whose fraction is closest to ρ.
        if not 0 < budget <= 1:
            raise ValueError(f"vamba: budget must be in (0, 1], got {budget}")
        sizes = group_sizes(tokens.video_grids) if tokens is not None else []
        if not sizes:
            raise ValueError("vamba: a budget needs the video's temporal groups; pass the TokenCounts of a video "
                             "sample (`tokens` with video_grids)")
        best = min(range(1, len(sizes) + 1), key=lambda c: abs(video_pair_fraction(sizes, c) - budget))
        return {"chunk_frames": None if best == len(sizes) else best}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # One chunk longer than any tiny video: every call global, the baseline's chunks and attention.
        return {"chunk_frames": 4096, "sinks": 0, "skip_mlp_from": None}


def video_pair_fraction(sizes: Sequence[int], chunk_frames: int | None, sinks: int = 0) -> float:
    """Fraction of the causal video→video (query, key) pairs computed with chunks of `chunk_frames` groups."""
    total = causal_pairs(sum(sizes))
    return (total - skipped_pairs(sizes, chunk_frames, sinks)) / total
