"""Plain text LMs (Llama, Mistral, Qwen2): no video; the shared prefix is the system turn plus an
optional text context, so DuoAttention can be checked against its official text-model results.

The processor is the tokenizer. Models without a chat template (base checkpoints) get the context and
the prompt joined by a blank line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from duokit.models.base import Adapter


class TextAdapter(Adapter):
    family = "text"
    model_types = ("llama", "mistral", "qwen2")
    is_multimodal = False

    @property
    def language_model(self):
        return self.model.model

    def render(self, prompt: str, with_video: bool = False, context: str | None = None) -> str:
        if with_video:
            raise ValueError(f"{self.model.config.model_type} is a text-only model; it cannot take a video. "
                             "Use a VLM (e.g. tiny:qwen2_5_vl) or pass frames=None with a text context.")
        content = f"{context}\n\n{prompt}" if context else prompt
        if self.tokenizer.chat_template is None:
            return content
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def process(self, text: str, frames: np.ndarray | None, fps: float | None) -> Any:
        if frames is not None:
            self.render("", with_video=True)  # raises the text-only error
        return self.tokenizer([text], add_special_tokens=False, return_tensors="pt").to(self.device)
