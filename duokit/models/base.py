"""The adapter protocol: everything the engine and the methods need to know about a model family.

An adapter wraps a loaded model and its processor. It knows where the language model's decoder
layers are, their head geometry, how to turn (frames, fps, prompt) into inputs through the real
processor, how to split a prompt into the shared prefix (system turn + video) and the per-try
suffix (question + options + assistant header), how to embed the prefix (vision tower included),
which prefix positions are video tokens, and the position ids of text tokens. Adding a family is
one subclass in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np
import torch

from duokit.data.resize import resize_frames

# One video's token grid after the spatial merge: (temporal groups, rows, columns).
Grid = tuple[int, int, int]


def mask_runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(start, end, value) of each run of equal values of a 1-D bool tensor, in order."""
    changes = ((mask[1:] != mask[:-1]).nonzero()[:, 0] + 1).tolist()
    bounds = [0, *changes, len(mask)]
    return [(start, end, bool(mask[start])) for start, end in pairwise(bounds)]


def video_layout(video_mask: torch.Tensor, grids: tuple[Grid, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(`frame_of` (L,), `cell_of` (L, 2)) of a prefix whose video tokens follow `grids` in raster order.

    The k-th video token of a video with grid (t, h, w) belongs to temporal group k // (h·w) and sits in
    cell (row, column) = divmod(k mod h·w, w): Qwen-VL's merger and LLaVA-OneVision's pooling both emit
    each frame's tokens row by row. Groups are numbered across videos (the second video's first group
    follows the first video's last). Tokens past the grids (LLaVA-OneVision's closing newline) and text
    tokens get -1.
    """
    length = video_mask.shape[0]
    frame_of = torch.full((length,), -1, dtype=torch.long, device=video_mask.device)
    cell_of = torch.full((length, 2), -1, dtype=torch.long, device=video_mask.device)
    slots = video_mask.nonzero()[:, 0]
    used, first_group = 0, 0
    for t, h, w in grids:
        count = t * h * w
        if used + count > len(slots):
            raise ValueError(f"video grids {grids} need {used + count} video tokens, the prefix has {len(slots)}")
        index = torch.arange(count, device=video_mask.device)
        where = slots[used:used + count]
        frame_of[where] = first_group + index // (h * w)
        cell_of[where, 0] = (index % (h * w)) // w
        cell_of[where, 1] = index % w
        used, first_group = used + count, first_group + t
    return frame_of, cell_of


@dataclass(frozen=True)
class TokenCounts:
    """A prefix's tokens per modality, what a method's KV estimate is computed from.

    `text` counts every non-video token in the cache (system turn, context, a try's suffix and the
    generated tokens it holds); `video` the video tokens as the processor emitted them, laid out by
    `video_grids` (one (t, h, w) grid per video, after the spatial merge).
    """

    text: int
    video: int = 0
    video_grids: tuple[Grid, ...] = ()

    @property
    def total(self) -> int:
        return self.text + self.video


@dataclass(frozen=True)
class Geometry:
    """The language model's shape, what analytic costs (KV bytes, FLOPs) are computed from."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    dtype_bytes: int


@dataclass(frozen=True)
class Prefix:
    """The shared prefix of one sample, embedded and positioned, ready for (chunked) prefill. Immutable:
    a method that changes it returns a new one (`keep`, `dataclasses.replace`).

    Parallel arrays over the L prefix tokens: `input_ids` (1, L), `inputs_embeds` (1, L, hidden),
    `position_ids` (3, 1, L) for M-RoPE families and (1, L) otherwise, `video_mask` (L,), and the video
    layout: `frame_of` (L,) the temporal group of each video token (-1 outside any frame), `cell_of`
    (L, 2) its (row, column) in its group's merged grid (-1 outside), with `video_grids` the (t, h, w)
    grid of each video after the merge. `layer_inputs` holds per-layer inputs of the language model with
    one row per video token, in order (Qwen3-VL's deepstack features: a list of (V, hidden) tensors);
    `Adapter.chunk_inputs` slices them per chunk. `costs` holds what a method measured while preparing
    the prefix (e.g. a selection pass's time, tokens it re-injected); the engine records them per sample.

    Text appended to the prefix (a try's suffix, then the generated tokens) continues at
    `next_position`, one position per token, as `generate` continues its position ids. With 1-D
    positions that is L; with M-RoPE it is the last (text) position + 1; under Qwen-VL's
    "transformers" rule that can be smaller than the largest video position (docs/architecture.md,
    "M-RoPE positions").
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    video_mask: torch.Tensor
    next_position: int
    frame_of: torch.Tensor | None = None
    cell_of: torch.Tensor | None = None
    video_grids: tuple[Grid, ...] = ()
    layer_inputs: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        length = self.input_ids.shape[1]
        if self.frame_of is None:  # no video: every token is outside any frame
            object.__setattr__(self, "frame_of", torch.full((length,), -1, dtype=torch.long,
                                                            device=self.input_ids.device))
        if self.cell_of is None:
            object.__setattr__(self, "cell_of", torch.full((length, 2), -1, dtype=torch.long,
                                                           device=self.input_ids.device))
        lengths = {"inputs_embeds": self.inputs_embeds.shape[1], "position_ids": self.position_ids.shape[-1],
                   "video_mask": self.video_mask.shape[0], "frame_of": self.frame_of.shape[0],
                   "cell_of": self.cell_of.shape[0]}
        wrong = {name: n for name, n in lengths.items() if n != length}
        if wrong:
            raise ValueError(f"Prefix arrays disagree on the token count: input_ids has {length}, {wrong}")

    @property
    def num_tokens(self) -> int:
        return self.inputs_embeds.shape[1]

    @property
    def num_video_tokens(self) -> int:
        return int(self.video_mask.sum())

    @property
    def token_counts(self) -> TokenCounts:
        video = self.num_video_tokens
        return TokenCounts(self.num_tokens - video, video, self.video_grids)

    def keep(self, mask: torch.Tensor) -> Prefix:
        """The prefix restricted to the tokens where `mask` (L,) is True, every parallel array alike.

        Kept tokens keep their position ids, layout and per-layer rows; `next_position` and the grids
        do not change (the grids describe the video, the layout says where each kept token came from).
        """
        mask = mask.to(device=self.video_mask.device, dtype=torch.bool)
        if mask.shape != self.video_mask.shape:
            raise ValueError(f"keep() needs a ({self.num_tokens},) mask, got {tuple(mask.shape)}")
        video_rows = mask[self.video_mask]  # which rows of the per-video-token inputs survive
        layer_inputs = {name: [rows[video_rows] for rows in per_layer] for name, per_layer in self.layer_inputs.items()}
        return replace(self, input_ids=self.input_ids[:, mask], inputs_embeds=self.inputs_embeds[:, mask],
                       position_ids=self.position_ids[..., mask], video_mask=self.video_mask[mask],
                       frame_of=self.frame_of[mask], cell_of=self.cell_of[mask], layer_inputs=layer_inputs)



class Adapter:
    """Base adapter; subclasses set `family`, `model_types` and override the family-specific parts."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `config.model_type` values this adapter handles
    is_multimodal: ClassVar[bool] = True
    # (width, height) every video frame is resized to before the processor, aspect not kept
    # (duokit/data/resize.py); set by load_vlm from duokit.json "frame_fit" (NeedleNet: the 56x56 it was
    # trained on, docs/needlenet.md). None: frames go to the processor as they are.
    frame_fit: tuple[int, int] | None = None

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    # --- geometry -------------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, `layers`, final norm); called directly by the engine."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def geometry(self) -> Geometry:
        config = self.text_config
        return Geometry(self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, config.hidden_size,
                        config.intermediate_size, torch.finfo(self.model.dtype).bits // 8)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def video_token_id(self) -> int | None:
        """The id the processor repeats once per video token (None for text LMs)."""
        return None

    def video_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`(L,)` bool: which positions of a one-prompt `(1, L)` batch are video tokens."""
        if self.video_token_id is None:
            return torch.zeros(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        return input_ids[0] == self.video_token_id

    # --- prompts --------------------------------------------------------------------------------
    def messages(self, prompt: str, with_video: bool, context: str | None) -> list[dict]:
        content = [{"type": "video"}] if with_video else []
        if context:
            content.append({"type": "text", "text": context})
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    def render(self, prompt: str, with_video: bool = True, context: str | None = None) -> str:
        """The full chat-formatted prompt text, video placeholder included, assistant header last."""
        return self.processor.apply_chat_template(
            self.messages(prompt, with_video, context), add_generation_prompt=True, tokenize=False)

    def split_prompt(self, prompt: str, with_video: bool | None = None, context: str | None = None,
                     question: str = "") -> tuple[str, str]:
        """(shared prefix text, per-try suffix text); the suffix starts where `prompt` starts, or right
        after `question` when one is given (the leading part of `prompt` the tries share, for methods
        whose prefix depends on the question).

        `with_video=None` means "the family's default": a video for VLMs, none for text LMs.
        """
        with_video = self.is_multimodal if with_video is None else with_video
        if not prompt.startswith(question) or question == prompt:
            raise ValueError(f"the question part {question!r} must be a proper start of the try prompt {prompt!r}")
        text = self.render(prompt, with_video, context)
        start = text.rfind(prompt)
        if not prompt or start < 0:
            raise ValueError(f"the chat template of {self.family} changed the prompt text; cannot split it "
                             f"into a shared prefix and a per-try suffix: {text!r}")
        start += len(question)
        return text[:start], text[start:]

    def video_kwargs(self, frames: np.ndarray, fps: float) -> dict:
        """Processor video kwargs: `frames` are already sampled, at `fps` frames per video second."""
        num_frames = len(frames)
        metadata = {"fps": float(fps), "total_num_frames": num_frames,
                    "frames_indices": list(range(num_frames)), "duration": num_frames / fps}
        return {"video_metadata": [metadata], "do_sample_frames": False, **self.size_kwargs(num_frames)}

    # --- frame resolution -----------------------------------------------------------------------
    def set_pixel_limits(self, max_pixels: int | None = None, min_pixels: int | None = None) -> None:
        """Pixels per frame the processor resizes frames into (families that resize by pixel count only)."""
        if max_pixels is not None or min_pixels is not None:
            raise ValueError(f"{self.family or 'this model'} does not resize frames by pixel count; drop "
                             "max_pixels/min_pixels (docs/video.md, \"Tokens per frame\")")

    def size_kwargs(self, num_frames: int) -> dict:
        """Processor kwargs that set the frame resolution for a video of `num_frames` frames."""
        return {}

    def vision_sequence(self, inputs: Any) -> tuple[int, int]:
        """(patches the vision tower runs on, patches of its largest attention group) for processor
        `inputs` (the memory planner's vision term); (0, 0) without a video."""
        return 0, 0

    def process(self, text: str, frames: np.ndarray | None, fps: float | None) -> Any:
        """Run the real processor on one prompt text (and video); tensors on the model's device."""
        kwargs: dict[str, Any] = {"return_tensors": "pt", "add_special_tokens": False}
        if frames is not None:
            if fps is None or fps <= 0:
                raise ValueError(f"frames need a positive fps (frames per video second), got {fps}")
            if self.frame_fit is not None:
                frames = resize_frames(frames, *self.frame_fit)
            kwargs["videos"] = [frames]
            kwargs["videos_kwargs"] = self.video_kwargs(frames, fps)
        inputs = self.processor(text=[text], **kwargs)
        return inputs.to(self.device)

    def build_inputs(self, frames: np.ndarray | None, fps: float | None, prompt: str,
                     context: str | None = None) -> Any:
        """Model inputs for the whole prompt (what `model.generate(**inputs)` takes)."""
        return self.process(self.render(prompt, frames is not None, context), frames, fps)

    def build_prefix(self, frames: np.ndarray | None, fps: float | None, context: str | None = None,
                     question: str = "") -> Any:
        """Processor inputs of the shared prefix only (system turn, video, optional context, and the
        shared `question` part of the prompt when given)."""
        # The prefix ends where the prompt (after `question`) starts, so any continuation gives it.
        prefix_text, _ = self.split_prompt(question + "?", frames is not None, context, question)
        return self.process(prefix_text, frames, fps)

    def suffix_ids(self, prompt: str, with_video: bool | None = None, context: str | None = None,
                   question: str = "") -> torch.Tensor:
        """Token ids `(1, n)` of one try's suffix: question (unless given as the shared `question` part),
        options, end of turn, assistant header.

        Raises if the tokenizer would merge tokens across the prefix/suffix boundary, where the prefix
        and suffix tokenized apart would not be the prompt's tokens.
        """
        prefix_text, suffix_text = self.split_prompt(prompt, with_video, context, question)
        ids = self.token_ids(suffix_text)
        if self.token_ids(prefix_text) + ids != self.token_ids(prefix_text + suffix_text):
            raise ValueError(f"{self.family}: the tokenizer merges tokens across the end of the shared "
                             f"prefix {prefix_text[-40:]!r}; the prompt cannot be split there")
        return torch.tensor([ids], device=self.device)

    def token_ids(self, text: str) -> list[int]:
        """`text` tokenized as is: the chat template already wrote every special token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- embedding, layout and positions ---------------------------------------------------------
    def video_grids(self, inputs: Any) -> tuple[Grid, ...]:
        """The (t, h, w) token grid of each video in processor `inputs`, after the merge (none here)."""
        return ()

    def embed_prefix(self, inputs: Any) -> Prefix:
        """Embed processor inputs (running the vision tower once) into a `Prefix` (text tokens only here;
        VLM adapters scatter their video features into it)."""
        input_ids = inputs["input_ids"]
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(input_ids)
        length = input_ids.shape[1]
        return self.with_layout(Prefix(input_ids=input_ids, inputs_embeds=embeds,
                                       position_ids=self.positions(0, length), video_mask=self.video_mask(input_ids),
                                       next_position=length), inputs)

    def with_layout(self, prefix: Prefix, inputs: Any) -> Prefix:
        """`prefix` with the video layout of processor `inputs` filled in."""
        grids = self.video_grids(inputs)
        frame_of, cell_of = video_layout(prefix.video_mask, grids)
        return replace(prefix, frame_of=frame_of, cell_of=cell_of, video_grids=grids)

    def positions(self, start: int, count: int) -> torch.Tensor:
        """Position ids of `count` text tokens whose first one sits at text position `start`."""
        return torch.arange(start, start + count, device=self.device).unsqueeze(0)

    def chunk_inputs(self, prefix: Prefix, start: int, end: int) -> dict[str, Any]:
        """Extra language-model inputs for prefix tokens `start:end` (none for most families)."""
        return {}
