"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one video placeholder expanded by the processor, M-RoPE positions.

Prefix embedding follows transformers 5.23's own VLM forward (the pixel path equals the embeddings path): video
features from `get_video_features` scattered into the token embeddings at the video-token positions,
and `(3, 1, L)` positions from `get_rope_index` (given `mm_token_type_ids`, which Qwen2-VL and Qwen3-VL
require), with the text after each video placed by the adapter's `text_after_video` rule: "qwen" (Qwen's
own code: one past the video's largest position) or "transformers" (`get_rope_index` of transformers
5.3-5.23 as is); docs/architecture.md, "M-RoPE positions". A try's suffix and its generated tokens
continue after the prefix's last (text) position, as `generate` continues its position ids. Qwen3-VL
also adds deepstack features to the video tokens' hidden states in its first decoder layers; they are
kept in `Prefix.layer_inputs` (one row per video token) and sliced per prefill chunk.
"""

from __future__ import annotations

from typing import Any

import torch

from duokit.models import DEFAULT_MAX_PIXELS
from duokit.models.base import Adapter, Grid, Prefix, mask_runs


def qwen_text_after_video(position_ids: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """`get_rope_index` positions `(3, 1, L)` with the text after each video placed as Qwen places it.

    Qwen's code (qwen-vl-finetune/qwenvl/data/rope2d.py::get_rope_index_25, transformers <= 5.2) starts
    the text after a video one past the video's largest position on any of the 3 axes; transformers
    5.3-5.23 start it at the video's start + max(h, w) / merge. Each text run after a video run is
    moved to Qwen's start, and the move carries to every later token (videos included: their positions
    are offsets from where they start).
    """
    positions = position_ids.clone()
    shift, video_start = 0, None
    for start, end, is_video in mask_runs(video_mask):
        positions[..., start:end] += shift
        if is_video:
            video_start = start
        elif video_start is not None:  # runs alternate, so a video run ends at `start`
            step = int(positions[..., video_start:start].max()) + 1 - int(positions[0, 0, start])
            positions[..., start:end] += step
            shift += step
    return positions


class QwenVLAdapter(Adapter):
    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    # Where text after a video starts: "qwen", the rule real Qwen-VL checkpoints were trained with, or
    # "transformers", `get_rope_index` of transformers 5.23 as is (what `generate` uses, and what NeedleNet
    # was trained with). `load_vlm` sets it from the model's duokit.json key "text_after_video".
    text_after_video_rules = ("qwen", "transformers")
    text_after_video = "qwen"

    max_pixels: int | None = None  # per frame; None: the processor's own cap, lowered to DEFAULT_MAX_PIXELS
    min_pixels: int | None = None  # per frame; None: the processor's own floor

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def video_grids(self, inputs: Any) -> tuple[Grid, ...]:
        if "video_grid_thw" not in inputs:
            return ()
        merge = self.model.config.vision_config.spatial_merge_size  # the merger joins merge x merge patches
        return tuple((int(t), int(h) // merge, int(w) // merge) for t, h, w in inputs["video_grid_thw"].tolist())

    def set_pixel_limits(self, max_pixels: int | None = None, min_pixels: int | None = None) -> None:
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 pixel per frame, got {value}")
        if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} is more than max_pixels {max_pixels}")
        self.max_pixels, self.min_pixels = max_pixels, min_pixels

    @property
    def budget_per_video(self) -> bool:
        """Qwen3-VL's video `size` bounds the pixels of the whole video (T·H·W), Qwen2/2.5-VL's one frame."""
        return self.model.config.model_type == "qwen3_vl"

    def size_kwargs(self, num_frames: int) -> dict:
        """`size` in pixels per frame, scaled to the whole video for Qwen3-VL (its `smart_resize` counts
        frames rounded to the temporal patch), and no extra per-video cap (`cap_pixels_per_frame`)."""
        video_processor = self.processor.video_processor
        own = video_processor.size
        frames = 1
        if self.budget_per_video:
            temporal = video_processor.temporal_patch_size
            frames = max(round(num_frames / temporal), 1) * temporal
        longest = own["longest_edge"] if self.max_pixels is None else self.max_pixels * frames
        if self.max_pixels is None:
            longest = min(longest, DEFAULT_MAX_PIXELS * frames)
        shortest = own["shortest_edge"] if self.min_pixels is None else self.min_pixels * frames
        return {"size": {"shortest_edge": min(shortest, longest), "longest_edge": longest},
                "cap_pixels_per_frame": False}

    def video_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patches of a `num_frames`-frame video of height x width px after the processor's
        resize, by the processor's own `smart_resize` rule (docs/video.md, "Tokens per frame")."""
        video_processor = self.processor.video_processor
        size = self.size_kwargs(num_frames)["size"]
        patch, temporal = video_processor.patch_size, video_processor.temporal_patch_size
        factor = patch * video_processor.merge_size
        if self.budget_per_video:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

            h, w = smart_resize(num_frames, height, width, temporal, factor,
                                size["shortest_edge"], size["longest_edge"])
        else:
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

            h, w = smart_resize(height, width, factor, size["shortest_edge"], size["longest_edge"])
        return -(-num_frames // temporal), h // patch, w // patch

    def vision_sequence(self, inputs: Any) -> tuple[int, int]:
        if "video_grid_thw" not in inputs:
            return 0, 0
        grid = inputs["video_grid_thw"].tolist()
        # Full-attention vision blocks attend within one temporal patch (h x w patches) at a time.
        return sum(t * h * w for t, h, w in grid), max(h * w for _, h, w in grid)

    def tokens_per_frame(self, num_frames: int, height: int, width: int) -> float:
        """Language-model tokens per frame: one per merge x merge patches of each temporal patch."""
        t, h, w = self.video_grid(num_frames, height, width)
        return t * h * w / self.processor.video_processor.merge_size ** 2 / num_frames

    def embed_prefix(self, inputs: Any) -> Prefix:
        core = self.model.model
        input_ids = inputs["input_ids"]
        video_mask = self.video_mask(input_ids)
        layer_inputs: dict[str, Any] = {}
        with torch.no_grad():
            embeds = core.get_input_embeddings()(input_ids)
            if "pixel_values_videos" not in inputs:
                length = input_ids.shape[1]
                return self.with_layout(Prefix(input_ids, embeds, self.positions(0, length), video_mask,
                                               next_position=length), inputs)
            video = core.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                            video_grid_thw=inputs["video_grid_thw"], return_dict=True)
            features = torch.cat(video.pooler_output, dim=0).to(embeds.device, embeds.dtype)
            if features.shape[0] != int(video_mask.sum()):
                raise ValueError(f"{features.shape[0]} video features for {int(video_mask.sum())} "
                                 "video tokens")
            embeds = embeds.masked_scatter(video_mask[None, :, None].expand_as(embeds), features)
            deepstack = getattr(video, "deepstack_features", None)
            if deepstack:
                layer_inputs["deepstack_visual_embeds"] = [
                    torch.cat(per_layer, dim=0).to(embeds.device, embeds.dtype) for per_layer in deepstack]
            rope_kwargs = {key: inputs[key] for key in ("video_grid_thw", "second_per_grid_ts")
                           if key in inputs}
            position_ids, _ = core.get_rope_index(
                input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                attention_mask=inputs.get("attention_mask"), **rope_kwargs)
        if self.text_after_video not in self.text_after_video_rules:
            raise ValueError(f"text_after_video must be one of {self.text_after_video_rules}, "
                             f"got {self.text_after_video!r}")
        if self.text_after_video == "qwen":
            position_ids = qwen_text_after_video(position_ids, video_mask)
        if video_mask[-1]:
            raise ValueError("a Qwen-VL prefix must end with a text token (<|vision_end|>) so the "
                             "position of the text after it is known; check the chat template")
        return self.with_layout(Prefix(input_ids, embeds, position_ids, video_mask,
                                       next_position=int(position_ids[0, 0, -1]) + 1, layer_inputs=layer_inputs),
                                inputs)

    def positions(self, start: int, count: int) -> torch.Tensor:
        return super().positions(start, count)[None].expand(3, 1, count)

    def chunk_inputs(self, prefix: Prefix, start: int, end: int) -> dict[str, Any]:
        deepstack = prefix.layer_inputs.get("deepstack_visual_embeds")
        if not deepstack:
            return {}
        # Deepstack rows follow the video tokens in order: rows [before, before + inside) belong here.
        before = int(prefix.video_mask[:start].sum())
        inside = int(prefix.video_mask[start:end].sum())
        return {"visual_pos_masks": prefix.video_mask[None, start:end],
                "deepstack_visual_embeds": [rows[before:before + inside] for rows in deepstack]}
