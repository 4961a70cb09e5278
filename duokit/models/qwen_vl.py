"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one video placeholder expanded by the processor, M-RoPE positions.

Prefix embedding follows reference transformers.md §7 ("Pixel path ≡ embeddings path"): video
features from `get_video_features` scattered into the token embeddings at the video-token positions,
and `(3, 1, L)` positions from `get_rope_index` (given `mm_token_type_ids`, which Qwen2-VL and Qwen3-VL
require). A try's suffix and its generated tokens continue after the prefix's last (text) position,
exactly as `generate` continues its position ids (see `Prefix`). Qwen3-VL
also adds deepstack features to the video tokens' hidden states in its first decoder layers; they are
kept in `Prefix.layer_inputs` and sliced per prefill chunk.
"""

from __future__ import annotations

from typing import Any

import torch

from duokit.models.base import Adapter, Prefix


class QwenVLAdapter(Adapter):
    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def embed_prefix(self, inputs: Any) -> Prefix:
        core = self.model.model
        input_ids = inputs["input_ids"]
        video_mask = self.video_mask(input_ids)
        layer_inputs: dict[str, Any] = {}
        with torch.no_grad():
            embeds = core.get_input_embeddings()(input_ids)
            if "pixel_values_videos" not in inputs:
                length = input_ids.shape[1]
                return Prefix(input_ids, embeds, self.positions(0, length), video_mask, next_position=length)
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
        if video_mask[-1]:
            raise ValueError("a Qwen-VL prefix must end with a text token (<|vision_end|>) so the "
                             "position of the text after it is known; check the chat template")
        return Prefix(input_ids, embeds, position_ids, video_mask,
                      next_position=int(position_ids[0, 0, -1]) + 1, layer_inputs=layer_inputs)

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
