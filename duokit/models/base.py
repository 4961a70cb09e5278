"""The adapter protocol: everything the engine and the methods need to know about a model family.

An adapter wraps a loaded model and its processor. It knows where the language model's decoder
layers are, their head geometry, how to turn (frames, fps, prompt) into inputs through the real
processor, how to split a prompt into the shared prefix (system turn + video) and the per-try
suffix (question + options + assistant header), how to embed the prefix (vision tower included),
which prefix positions are video tokens, and the position ids of text tokens. Adding a family is
one subclass in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class Prefix:
    """The shared prefix of one sample, embedded and positioned, ready for (chunked) prefill.

    `position_ids` is `(3, 1, L)` for M-RoPE families and `(1, L)` otherwise. Text appended to the
    prefix (a try's suffix, then the generated tokens) continues at `next_position`, one position per
    token, as `generate` continues its position ids. With 1-D positions that is L; with M-RoPE it is
    the last (text) position + 1; under Qwen-VL's "transformers" rule that can be smaller than the
    largest video position (docs/architecture.md, "M-RoPE positions"). `layer_inputs` holds extra per-video-token
    inputs of the language model (Qwen3-VL deepstack features, one row per video token in order),
    sliced per chunk by `Adapter.chunk_inputs`; a method that drops video tokens drops their rows too.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    video_mask: torch.Tensor
    next_position: int
    layer_inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.inputs_embeds.shape[1]

    @property
    def num_video_tokens(self) -> int:
        return int(self.video_mask.sum())


class Adapter:
    """Base adapter; subclasses set `family`, `model_types` and override the family-specific parts."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `config.model_type` values this adapter handles
    is_multimodal: ClassVar[bool] = True

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

    def split_prompt(self, prompt: str, with_video: bool | None = None,
                     context: str | None = None) -> tuple[str, str]:
        """(shared prefix text, per-try suffix text); the suffix starts where `prompt` starts.

        `with_video=None` means "the family's default": a video for VLMs, none for text LMs.
        """
        with_video = self.is_multimodal if with_video is None else with_video
        text = self.render(prompt, with_video, context)
        start = text.rfind(prompt)
        if not prompt or start < 0:
            raise ValueError(f"the chat template of {self.family} changed the prompt text; cannot split it "
                             f"into a shared prefix and a per-try suffix: {text!r}")
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
            kwargs["videos"] = [frames]
            kwargs["videos_kwargs"] = self.video_kwargs(frames, fps)
        inputs = self.processor(text=[text], **kwargs)
        return inputs.to(self.device)

    def build_inputs(self, frames: np.ndarray | None, fps: float | None, prompt: str,
                     context: str | None = None) -> Any:
        """Model inputs for the whole prompt (what `model.generate(**inputs)` takes)."""
        return self.process(self.render(prompt, frames is not None, context), frames, fps)

    def build_prefix(self, frames: np.ndarray | None, fps: float | None, context: str | None = None) -> Any:
        """Processor inputs of the shared prefix only (system turn, video, optional context)."""
        # The prefix ends where the prompt starts, so any prompt gives the same prefix text.
        prefix_text, _ = self.split_prompt("?", frames is not None, context)
        return self.process(prefix_text, frames, fps)

    def suffix_ids(self, prompt: str, with_video: bool | None = None,
                   context: str | None = None) -> torch.Tensor:
        """Token ids `(1, n)` of one try's suffix: question, options, end of turn, assistant header.

        Raises if the tokenizer would merge tokens across the prefix/suffix boundary, where the prefix
        and suffix tokenized apart would not be the prompt's tokens.
        """
        prefix_text, suffix_text = self.split_prompt(prompt, with_video, context)
        ids = self.token_ids(suffix_text)
        if self.token_ids(prefix_text) + ids != self.token_ids(prefix_text + suffix_text):
            raise ValueError(f"{self.family}: the tokenizer merges tokens across the end of the shared "
                             f"prefix {prefix_text[-40:]!r}; the prompt cannot be split there")
        return torch.tensor([ids], device=self.device)

    def token_ids(self, text: str) -> list[int]:
        """`text` tokenized as is: the chat template already wrote every special token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- embedding and positions ----------------------------------------------------------------
    def embed_prefix(self, inputs: Any) -> Prefix:
        """Embed processor inputs (running the vision tower once) into a `Prefix`."""
        input_ids = inputs["input_ids"]
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(input_ids)
        length = input_ids.shape[1]
        return Prefix(input_ids=input_ids, inputs_embeds=embeds,
                      position_ids=self.positions(0, length), video_mask=self.video_mask(input_ids),
                      next_position=length)

    def positions(self, start: int, count: int) -> torch.Tensor:
        """Position ids of `count` text tokens whose first one sits at text position `start`."""
        return torch.arange(start, start + count, device=self.device).unsqueeze(0)

    def chunk_inputs(self, prefix: Prefix, start: int, end: int) -> dict[str, Any]:
        """Extra language-model inputs for prefix tokens `start:end` (none for most families)."""
        return {}
