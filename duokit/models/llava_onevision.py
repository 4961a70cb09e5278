"""LLaVA-OneVision: frames through SigLIP, bilinear 2x pooling, one newline token after the video.

The processor expands the `<video>` placeholder into frames x tokens-per-frame + 1 video tokens; the
language model (Qwen2) uses plain 1-D positions. Layout: each frame's pooled tokens row by row; the
closing newline token is a video token outside any frame.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from duokit.models.base import Adapter, Grid, Prefix


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_index

    def video_grids(self, inputs: Any) -> tuple[Grid, ...]:
        if "pixel_values_videos" not in inputs:
            return ()
        # The processor wrote frames x (h x w) pooled tokens + 1 newline token; frames are square here.
        frames = inputs["pixel_values_videos"].shape[1]
        per_frame = (int(self.video_mask(inputs["input_ids"]).sum()) - 1) // frames
        side = math.isqrt(per_frame)
        if side * side != per_frame:
            raise ValueError(f"LLaVA-OneVision: {per_frame} video tokens per frame is not a square grid")
        return ((frames, side, side),)
    def vision_sequence(self, inputs: Any) -> tuple[int, int]:
        if "pixel_values_videos" not in inputs:
            return 0, 0
        vision = self.model.config.vision_config
        frames, side = inputs["pixel_values_videos"].shape[1], inputs["pixel_values_videos"].shape[-1]
        per_frame = (side // vision.patch_size) ** 2  # SigLIP attends within one frame
        return frames * per_frame, per_frame

    def embed_prefix(self, inputs: Any) -> Prefix:
        prefix = super().embed_prefix(inputs)
        if "pixel_values_videos" not in inputs:
            return prefix
        config = self.model.config
        with torch.no_grad():
            video = self.model.model.get_video_features(
                inputs["pixel_values_videos"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True)
        features = video.pooler_output.flatten(0, 1).to(prefix.inputs_embeds)
        if features.shape[0] != prefix.num_video_tokens:
            raise ValueError(f"{features.shape[0]} video features for {prefix.num_video_tokens} video tokens")
        embeds = prefix.inputs_embeds
        video_slots = prefix.video_mask[None, :, None].expand_as(embeds)
        return replace(prefix, inputs_embeds=embeds.masked_scatter(video_slots, features))
