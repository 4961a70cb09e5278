"""`llavolta`: LLaVolta's visual context compressor, training-free — pool the video tokens at LM layer K.

At decoder layer K the video tokens' hidden states are average-pooled with stride s within each
temporal group (`pooling.py`) and their position ids pooled component-wise; text keeps its hidden
states and positions. Layers >= K run on the shorter sequence, so their KV cache holds only the
pooled tokens; a try's suffix and the answer continue at the prefix's `next_position`, as without
pooling. K = 0 pools the prefix's embeddings before the first layer (`prepare_prefix`).

Model side (K >= 1), on transformers' extension points only:
- the prefill passes each chunk's pooling plan as an extra language-model keyword, which the model
  hands to every decoder layer; chunk ends fall between pooled tokens (`aligned_bounds`);
- a forward pre-hook (with kwargs) on each decoder layer takes the plan out; from layer K on it swaps
  in the pooled sequence's rotary embeddings (`rotary_emb` of the model, at the pooled positions), and
  on layer K it pools the hidden states;
- attention stays the model's own sdpa/eager function with a plain `DynamicCache`. The causal mask the
  model builds for layer 0's lengths is lower-right aligned, so its last q' rows and last kv' columns
  are the causal mask of a layer holding kv' keys for q' queries: layers >= K get that slice (the
  official code slices its mask to the compressed lengths too). Decoding needs no mask (one query).

Qwen3-VL adds deepstack features to the video tokens after its first decoder layers (one per
`deepstack_visual_indexes` entry). K = 0 pools those rows with the same groups as the embeddings (a
pooled token gets the mean of its members' features); 0 < K < the number of deepstack layers is
refused: the model adds full-length rows at fixed video positions after those layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from duokit.methods.base import Method, register_method
from duokit.methods.llavolta.pooling import (
    POSITION_MODES,
    aligned_bounds,
    pool_assignment,
    pool_positions,
    pool_rows,
    pooled_length,
)
from duokit.methods.preallocated import PreallocatedCache

# The language-model keyword carrying one prefill chunk's pooling plan to the decoder-layer hooks.
CHUNK_KWARG = "duokit_llavolta_chunk"
# LLaVolta's single-stage settings (methods: scripts/v1_5 heavy-compression L2 s8, light-compression
# L16 s8 of 32 layers, i.e. half the depth).
PRESETS = {"heavy": {"layer": 2, "stride": 8}, "light": {"layer": "half", "stride": 8}}


class ChunkPlan(NamedTuple):
    assignment: torch.Tensor  # (q,) pooled token of each chunk token, from 0
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # the model's rotary (cos, sin) at pooled positions


@register_method
@dataclass
class LLaVolta(Method):
    """Settings: `preset` (`heavy`: K=2, s=8; `light`: K = half the layers, s=8), `layer` K and `stride`
    s (each overrides the preset's), `positions` (`mean`: float mean of the pooled M-RoPE/1-D positions;
    `floor`: rounded down to an integer, as the official code casts them). s = 1 is the identity."""

    name = "llavolta"
    preset: str = "heavy"
    layer: int | None = None
    stride: int | None = None
    positions: str = "mean"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"llavolta preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"llavolta positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"llavolta layer must be an integer >= 0 (0 = pool before the first layer), "
                             f"got {self.layer!r}")
        if not isinstance(self.pool_stride, int) or self.pool_stride < 1:
            raise ValueError(f"llavolta stride must be an integer >= 1 (1 = no pooling), got {self.pool_stride!r}")

    @property
    def pool_stride(self) -> int:
        return PRESETS[self.preset]["stride"] if self.stride is None else self.stride

    def pool_layer(self, num_layers: int) -> int:
        """K for a language model of `num_layers` layers."""
        layer = PRESETS[self.preset]["layer"] if self.layer is None else self.layer
        layer = num_layers // 2 if layer == "half" else layer
        if layer >= num_layers:
            raise ValueError(f"llavolta layer {layer} is not below the model's {num_layers} layers; use 0 to "
                             f"{num_layers - 1}")
        return layer

    @contextlib.contextmanager
    def install(self, model: Any, adapter: Any) -> Iterator[None]:
        layer = self.pool_layer(adapter.num_layers)
        vision = getattr(model.config, "vision_config", None)
        deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        if 0 < layer < deepstack:
            raise ValueError(f"llavolta layer {layer} falls among the {deepstack} deepstack layers of this model, "
                             f"which add visual features to the unpooled video tokens; use layer 0 or >= {deepstack}")
        implementation = adapter.text_config._attn_implementation
        if layer > 0 and implementation not in ("sdpa", "eager"):
            raise ValueError(f"llavolta slices the sdpa/eager causal mask; the language model uses {implementation!r}")
        if getattr(adapter.text_config, "use_sliding_window", False):
            raise ValueError("llavolta assumes causal attention over the whole prefix; this model uses sliding windows")
        handles = [] if layer == 0 else [
            decoder.register_forward_pre_hook(_layer_hook(index, layer), with_kwargs=True)
            for index, decoder in enumerate(adapter.decoder_layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def prepare_prefix(self, prefix: Any, sample: Any, lm: Any) -> Any:
        if self.pool_layer(lm.geometry.num_layers) > 0:
            return prefix
        return pool_prefix(prefix, self._assignment(prefix), self.positions)

    def prefill(self, lm: Any, prefix: Any, cache: Any, chunk_size: int) -> Any:
        layer = self.pool_layer(lm.geometry.num_layers)
        if layer == 0:  # pooled in prepare_prefix
            return lm.prefill(prefix, cache, chunk_size)
        assignment = self._assignment(prefix)
        if isinstance(cache, PreallocatedCache) and cache.get_seq_length() == 0:
            # The default cache sizes every layer for the whole prefix; layers >= K hold only the pooled
            # tokens, so they are sized for those (else the memory pooling saves is allocated anyway).
            for pooled_layer in cache.layers[layer:]:
                pooled_layer.capacity = int(assignment[-1]) + 1 + pooled_layer.reserve
        rotary = lm.rotary

        def chunk_kwargs(start: int, end: int) -> dict[str, ChunkPlan]:
            local = assignment[start:end] - assignment[start]
            positions = pool_positions(prefix.position_ids[..., start:end], local, self.positions)
            return {CHUNK_KWARG: ChunkPlan(local, rotary(prefix.inputs_embeds[:, start:end], positions))}

        return lm.prefill(prefix, cache, chunk_size, bounds=aligned_bounds(assignment, chunk_size),
                          chunk_kwargs=chunk_kwargs)

    def _assignment(self, prefix: Any) -> torch.Tensor:
        return pool_assignment(prefix.frame_of, self.pool_stride)

    def layer_tokens(self, geometry: Any, tokens: Any) -> list[int]:
        # Layers < K hold every token, layers >= K only the pooled ones. A video grid (t, h, w) is t
        # temporal groups of h*w tokens, the groups `frame_of` numbers.
        video_groups = [h * w for t, h, w in tokens.video_grids for _ in range(t)]
        layer = self.pool_layer(geometry.num_layers)
        pooled = pooled_length(tokens.total, video_groups, self.pool_stride)
        return [tokens.total] * layer + [pooled] * (geometry.num_layers - layer)

    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        # Layers >= K keep 1/s of the video tokens; the layers before K keep them all (achieved budget measured).
        if not 0 < budget <= 1:
            raise ValueError(f"llavolta: budget must be in (0, 1], got {budget}")
        return {"stride": max(1, round(1 / budget))}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # Stride 1 pools nothing; a layer inside the stack runs the hooks' rotary swap and mask slicing.
        return {"layer": geometry.num_layers // 2, "stride": 1}


def _layer_hook(index: int, pool_layer: int):
    """Forward pre-hook of decoder layer `index` (see the module docstring)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        plan = kwargs.pop(CHUNK_KWARG, None)
        if index < pool_layer:
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        if plan is not None:
            if index == pool_layer:
                hidden = pool_rows(hidden, plan.assignment, dim=1)
            kwargs["position_embeddings"] = plan.position_embeddings
        mask = kwargs.get("attention_mask")
        if mask is not None:
            cache = kwargs.get("past_key_values")
            queries = hidden.shape[1]
            keys = queries + (cache.get_seq_length(index) if cache is not None else 0)
            kwargs["attention_mask"] = mask[..., -queries:, -keys:]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def pool_prefix(prefix: Any, assignment: torch.Tensor, positions: str) -> Any:
    """The prefix with its pooled tokens (K = 0): embeddings, positions, per-video-token rows (deepstack)
    pooled; each pooled token takes its first member's id, video flag, group and grid cell. `video_grids`
    stay the grids the processor emitted (what the KV estimate pools)."""
    first = torch.ones_like(assignment, dtype=torch.bool)
    first[1:] = assignment[1:] != assignment[:-1]
    layer_inputs = dict(prefix.layer_inputs)
    if "deepstack_visual_embeds" in layer_inputs:
        # Rows follow the video tokens in order; the video tokens of one pooled token share a row.
        rows = torch.unique_consecutive(assignment[prefix.video_mask], return_inverse=True)[1]
        layer_inputs["deepstack_visual_embeds"] = [pool_rows(embeds, rows, dim=0)
                                                   for embeds in layer_inputs["deepstack_visual_embeds"]]
    return replace(prefix, input_ids=prefix.input_ids[:, first],
                   inputs_embeds=pool_rows(prefix.inputs_embeds, assignment, dim=1),
                   position_ids=pool_positions(prefix.position_ids, assignment, positions),
                   video_mask=prefix.video_mask[first], frame_of=prefix.frame_of[first],
                   cell_of=prefix.cell_of[first], layer_inputs=layer_inputs)
