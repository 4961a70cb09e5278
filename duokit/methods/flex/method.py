"""`flex`: FlexAttention (arXiv 2407.20228), training-free — attention-guided high-resolution re-injection.

Per sample (question-dependent prefix, `prefix_depends_on_question`):

1. The context holds every frame at the low resolution: the engine's prefix (frames at `high_res`, or
   the run's resolution) gives the high-res tokens, and the same frames go through the same vision tower
   once more at `low_res` for the context (`prepare_prefix`; skipped when both resolutions agree).
2. Selection pass (`probe.py`): the question rows' attention at decoder layer `select_layer` over the
   low-res video tokens, from post-RoPE queries and cached keys (no N × N matrix, no `output_attentions`);
   then FlexAttention's rule (`select.py`): per-row min-max, threshold, coarse cells, optional budget cap;
   or the random control.
3. The selected high-res tokens are appended after the low-res context, wrapped in the chat template's
   own video markers, at their M-RoPE positions mapped into the low-res grid's range (float), and the
   question is stated again ("look again"). The prefix is then

       <low-res prefix: … <|vision_start|>{low-res video}<|vision_end|>{question}>
       <|vision_start|>{selected high-res tokens}<|vision_end|>{question}

   and each try's suffix (options, instruction, assistant header) follows, as for the baseline. The
   markers and the restated question take text positions after the prefix's; the high-res tokens take
   none of their own (they share the video's range). An empty selection appends nothing: the sample is
   answered from the low-res prefix alone, i.e. as the baseline at the low resolution.
4. Prefill and decoding are the baseline's (the model's attention, a plain cache).

Costs per sample (`Prefix.costs`): `low_res_tokens`, `high_res_tokens`, `selected_tokens`,
`look_again_tokens` (markers + restated question), `selection_s` (selection pass + rule) and
`low_res_vision_s` (the second vision-tower run).

Families: Qwen2/2.5/3-VL (M-RoPE). LLaVA-OneVision is refused off the identity: its processor resizes
every frame to one fixed size (no pixel budget to set per call), and its 1-D positions have no 2-D grid
range to place high-res tokens in (they would get positions of the text after the video).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from duokit.methods.base import Method, register_method
from duokit.methods.flex.probe import question_attention
from duokit.methods.flex.select import SELECTIONS, high_res_positions, select_tokens
from duokit.metrics import Stopwatch

# Query rows whose attention selects: every token after the video (the question; their cells are
# united), or only the prefix's last token (FlexAttention's inference row, the last prompt token).
ROWS = ("question", "last")
PROBE_CHUNK = 2048  # tokens per chunk of the selection pass (the engine's default prefill chunk)


@register_method
@dataclass
class Flex(Method):
    """Settings: `low_res` (the context's frames: a float <= 1 is that fraction of the high-res pixels per
    frame, e.g. 0.25 = half the side; > 1 is pixels per frame), `high_res` (pixels per frame of the
    high-res tokens; None: the run's own resolution), `select_layer` (None: L // 4, FlexAttention's 8 of
    32), `threshold` (on the min-max normalised row, FlexAttention's 48/255), `cell` (coarse cell side in
    high-res merged tokens, FlexAttention's 72/9 = 8), `budget` (None, or a cap: this fraction of the
    high-res tokens, cells by attention mass), `selection` (`attention`, or `random`: each cell with
    probability `random_p`, FlexAttention's `special=random` at 0.1, drawn from `seed` and the sample),
    `rows` (`question`: the rows of every token after the video, their cells united; `last`: the prefix's
    last token only, FlexAttention's inference row)."""

    name = "flex"
    prefix_depends_on_question = True
    low_res: float = 0.25
    high_res: int | None = None
    select_layer: int | None = None
    threshold: float = 48 / 255
    cell: int = 8
    budget: float | None = None
    selection: str = "attention"
    seed: int = 0
    random_p: float = 0.1
    rows: str = "question"

    def __post_init__(self) -> None:
        if not self.low_res > 0:
            raise ValueError(f"flex low_res must be > 0 (a fraction <= 1 of the high-res pixels, or pixels per "
                             f"frame), got {self.low_res!r}")
        if self.high_res is not None and self.high_res < 1:
            raise ValueError(f"flex high_res must be pixels per frame >= 1 or None, got {self.high_res!r}")
        if self.select_layer is not None and self.select_layer < 0:
            raise ValueError(f"flex select_layer must be >= 0, got {self.select_layer!r}")
        if self.cell < 1:
            raise ValueError(f"flex cell must be >= 1 high-res token, got {self.cell!r}")
        if self.budget is not None and not 0 <= self.budget <= 1:
            raise ValueError(f"flex budget must be a fraction in [0, 1] or None, got {self.budget!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"flex selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.rows not in ROWS:
            raise ValueError(f"flex rows must be one of {', '.join(ROWS)}, got {self.rows!r}")
        if not 0 <= self.random_p <= 1:
            raise ValueError(f"flex random_p must be a probability in [0, 1], got {self.random_p!r}")

    @property
    def selects_nothing(self) -> bool:
        """True when no cell can be selected (budget 0, a threshold no normalised value exceeds, p = 0)."""
        if self.budget == 0:
            return True
        return self.threshold >= 1 if self.selection == "attention" else self.random_p == 0

    def layer(self, num_layers: int) -> int:
        layer = num_layers // 4 if self.select_layer is None else self.select_layer
        if layer >= num_layers:
            raise ValueError(f"flex select_layer {layer} is not below the model's {num_layers} layers")
        return layer

    # --- run scope ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def install(self, model: Any, adapter: Any) -> Iterator[None]:
        self.layer(adapter.num_layers)
        identity = self.low_res == 1 and self.high_res is None and self.selects_nothing
        if adapter.is_multimodal and adapter.positions(0, 1).dim() != 3 and not identity:
            raise ValueError(f"flex needs M-RoPE positions and a per-call pixel budget (Qwen2/2.5/3-VL); "
                             f"{adapter.family} has 1-D positions and a fixed frame size, so only the identity "
                             f"(low_res=1.0, high_res unset, budget=0) runs (docs/methods/flex.md)")
        if self.high_res is None:
            yield
            return
        saved = getattr(adapter, "max_pixels", None), getattr(adapter, "min_pixels", None)
        adapter.set_pixel_limits(self.high_res, self.high_res)
        try:
            yield
        finally:
            adapter.set_pixel_limits(*saved)

    # --- per sample --------------------------------------------------------------------------------
    def prepare_prefix(self, prefix: Any, sample: Any, lm: Any) -> Any:
        high = prefix
        costs = {"high_res_tokens": high.num_video_tokens, "low_res_tokens": high.num_video_tokens,
                 "selected_tokens": 0, "look_again_tokens": 0, "selection_s": 0.0, "low_res_vision_s": 0.0}
        if high.num_video_tokens == 0:
            return replace(prefix, costs={**prefix.costs, **costs})
        low = high
        pixels = self.low_res_pixels(lm.adapter, high)
        if pixels is not None:
            with Stopwatch(lm.device) as watch:
                low = embed_at(lm, sample, pixels)
            check_same_frames(low, high)
            costs.update(low_res_tokens=low.num_video_tokens, low_res_vision_s=watch.seconds)
        if self.selects_nothing:
            return replace(low, costs={**prefix.costs, **costs})
        with Stopwatch(lm.device) as watch:
            chosen = self.choose(lm, low, high, sample)
        costs.update(selected_tokens=int(chosen.sum()), selection_s=watch.seconds)
        if not chosen.any():
            return replace(low, costs={**prefix.costs, **costs})
        question = lm.adapter.token_ids(sample.question)
        costs["look_again_tokens"] = 2 + len(question)
        return replace(look_again(lm, low, high, chosen.to(high.video_mask.device), question),
                       costs={**prefix.costs, **costs})

    def low_res_pixels(self, adapter: Any, high: Any) -> int | None:
        """Pixels per frame of the low-res context, None when it is the high-res prefix itself."""
        if self.low_res > 1:
            return None if self.high_res == round(self.low_res) else round(self.low_res)
        if self.low_res == 1:
            return None
        processor = adapter.processor.video_processor
        side = processor.patch_size * processor.merge_size  # pixels of one merged token's side
        _, h, w = high.video_grids[0]
        return round(self.low_res * h * w * side * side)

    def choose(self, lm: Any, low: Any, high: Any, sample: Any) -> torch.Tensor:
        """`(N,)` bool over the high-res video tokens: the ones to re-inject."""
        attention = None
        if self.selection == "attention":
            rows_from = int(low.video_mask.nonzero()[-1, 0]) + 1 if self.rows == "question" else low.num_tokens - 1
            layer = self.layer(lm.geometry.num_layers)
            attention = question_attention(lm, low, layer, rows_from, PROBE_CHUNK).cpu()
        return select_tokens(attention, low.video_grids, high.video_grids, threshold=self.threshold, cell=self.cell,
                             budget=self.budget, selection=self.selection, random_p=self.random_p,
                             generator=self.generator(sample) if self.selection == "random" else None)

    def generator(self, sample: Any) -> torch.Generator:
        """The random control's draws: from `seed` and the sample (its frames and question), so a sample
        draws alike in every run and on resume, and samples differ."""
        digest = hashlib.blake2b(str(self.seed).encode(), digest_size=8)
        if sample.frames is not None:
            digest.update(sample.frames.tobytes())
        digest.update(sample.question.encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    # --- costs -------------------------------------------------------------------------------------
    def layer_tokens(self, geometry: Any, tokens: Any) -> list[int]:
        # Before a run (the planner): the low-res context (when given as a fraction) plus every high-res
        # token the budget allows; the restated question is not counted. Per sample: estimate_sample_kv_bytes.
        low = tokens.video * min(self.low_res, 1)
        total = tokens.text + round(low) + round(tokens.video * (1 if self.budget is None else self.budget))
        return [total] * geometry.num_layers

    def estimate_sample_kv_bytes(self, geometry: Any, tokens: Any, prefix: Any) -> int:
        # `tokens.text` counts the prompt's text (same at both resolutions) and the longest try; the cache
        # also holds the look-again markers and question, and the context's and re-injected video tokens.
        total = tokens.text + prefix.costs["look_again_tokens"] + prefix.num_video_tokens
        return self.kv_bytes_of_layers(geometry, [total] * geometry.num_layers)

    # --- budgets -----------------------------------------------------------------------------------
    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        # The ablation plan's split: the low-res context at ρ/2 of the pixels (≈ ρ/2 of the video tokens)
        # and the re-injected high-res tokens capped at ρ/2 of them. The achieved budget is measured.
        if not 0 < budget <= 1:
            raise ValueError(f"flex: budget must be in (0, 1], got {budget}")
        return {"low_res": budget / 2, "budget": budget / 2}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # Both resolutions the run's own and nothing selected: the plain baseline.
        return {"low_res": 1.0, "budget": 0.0}


def embed_at(lm: Any, sample: Any, pixels: int) -> Any:
    """The sample's prefix embedded with frames of `pixels` pixels (the adapter's limits restored after)."""
    adapter = lm.adapter
    saved = getattr(adapter, "max_pixels", None), getattr(adapter, "min_pixels", None)
    adapter.set_pixel_limits(pixels, pixels)
    try:
        return lm.embed(sample)
    finally:
        adapter.set_pixel_limits(*saved)


def check_same_frames(low: Any, high: Any) -> None:
    """Both prefixes must hold the same frames and the same text (only the video tokens per group differ)."""
    low_groups = [t for t, _, _ in low.video_grids]
    high_groups = [t for t, _, _ in high.video_grids]
    low_text, high_text = low.num_tokens - low.num_video_tokens, high.num_tokens - high.num_video_tokens
    if low_groups != high_groups or low_text != high_text:
        raise ValueError(f"flex: the low-res prefix (grids {low.video_grids}, {low_text} text tokens) does not "
                         f"hold the high-res prefix's frames and text (grids {high.video_grids}, {high_text})")


def look_again(lm: Any, low: Any, high: Any, chosen: torch.Tensor, question: list[int]) -> Any:
    """`low` followed by the chosen high-res tokens between the video markers, then the question again."""
    video = low.video_mask.nonzero()[:, 0]
    first, last = int(video[0]), int(video[-1])
    device = low.input_ids.device
    markers = low.input_ids[0, [first - 1, last + 1]]  # the template's tokens around the video
    text_ids = torch.cat([markers, torch.tensor(question, dtype=torch.long, device=device)])
    with torch.no_grad():
        text_embeds = lm.adapter.model.get_input_embeddings()(text_ids[None]).to(low.inputs_embeds.dtype)
    count = int(chosen.sum())
    high_video = high.video_mask
    ids = torch.cat([low.input_ids[0], markers[:1], high.input_ids[0, high_video][chosen], text_ids[1:]])[None]
    embeds = torch.cat([low.inputs_embeds, text_embeds[:, :1], high.inputs_embeds[:, high_video][:, chosen],
                        text_embeds[:, 1:]], dim=1)
    start = low.next_position
    text_positions = torch.arange(start, start + 1 + len(text_ids) - 1, dtype=torch.float32, device=device)
    hd_positions = high_res_positions(low.position_ids[:, 0, video].cpu(), low.video_grids,
                                      high.video_grids).to(device)[:, chosen]
    positions = torch.cat([low.position_ids[:, 0].float(), text_positions[:1].expand(3, 1), hd_positions,
                           text_positions[1:].expand(3, -1)], dim=1)[:, None]
    marks = torch.zeros(1, dtype=torch.bool, device=device)
    after = torch.zeros(len(text_ids) - 1, dtype=torch.bool, device=device)
    no_frame = torch.full((1,), -1, dtype=torch.long, device=device)
    layer_inputs = dict(low.layer_inputs)
    if "deepstack_visual_embeds" in layer_inputs:  # Qwen3-VL: one row per video token, in order
        layer_inputs["deepstack_visual_embeds"] = [
            torch.cat([low_rows, high_rows[chosen]]) for low_rows, high_rows in
            zip(low.layer_inputs["deepstack_visual_embeds"], high.layer_inputs["deepstack_visual_embeds"])]
    return replace(
        low, input_ids=ids, inputs_embeds=embeds, position_ids=positions,
        video_mask=torch.cat([low.video_mask, marks, torch.ones(count, dtype=torch.bool, device=device), after]),
        frame_of=torch.cat([low.frame_of, no_frame, high.frame_of[high_video][chosen], no_frame.expand(len(after))]),
        cell_of=torch.cat([low.cell_of, no_frame.expand(1, 2), high.cell_of[high_video][chosen],
                           no_frame.expand(len(after), 2)]),
        next_position=start + len(text_ids), layer_inputs=layer_inputs)
