"""Training examples for the gates: embedded, positioned sequences with an answer-token mask.

Two sources, both a pure function of (settings, index), so resuming at step k only needs k:
- `VideoNeedleData` (VLMs): the synthesizer's training variant (duokit/data/synth/training.py; several
  needles and questions per video, never VNBench — in place of the paper's synthetic multi-passkey data,
  arXiv 2410.10819, official `duo_attn/data.py::MultiplePasskeyRetrievalDataset`) as a multi-turn chat:
  the video and the first question, then each answer teacher-forced, then the next question.
- `PasskeyData` (text LMs): the official multi-passkey recipe (mit-han-lab/duo-attention) on a local text
  file the user passes (the BookSum link is dead): 10 passkeys of 32 NATO words at sorted depths from
  linspace(0.05, 0.95, 1000), context lengths from linspace(min, max, 50) visited in a shuffled order,
  the official needle/question wording (its "Remeber" typo included).
The loss mask covers the answer words only (the passkeys; the needle words of the synthetic answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duokit.data.synth.training import QA, TrainingConfig, TrainingGenerator


@dataclass
class Example:
    """One training sequence for the language model (batch 1; `two_way` doubles it)."""

    inputs_embeds: torch.Tensor  # [1, L, hidden]
    position_ids: torch.Tensor  # [1, L] or [3, 1, L] (M-RoPE)
    answer_mask: torch.Tensor  # [L] bool: positions whose hidden states enter the loss
    input_ids: torch.Tensor  # [1, L] (for inspection; the model gets the embeddings)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.inputs_embeds.shape[1]

    def two_way(self) -> dict[str, Any]:
        """Language-model inputs for the teacher (first half) + student (second half) batch."""
        doubled = {key: [torch.cat([v, v]) for v in value] if isinstance(value, list) else torch.cat([value, value])
                   for key, value in self.model_kwargs.items()}
        return {"inputs_embeds": torch.cat([self.inputs_embeds, self.inputs_embeds]),
                "position_ids": torch.cat([self.position_ids, self.position_ids], dim=-2), **doubled}


def answer_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> torch.Tensor:
    """Tokens whose character range overlaps any [start, end) answer span."""
    return torch.tensor([any(start < span_end and span_start < end for span_start, span_end in spans)
                         for start, end in offsets], dtype=torch.bool)


class ChatExamples:
    """Encodes a video and its question/answer turns as one teacher-forced chat for a VLM adapter."""

    def __init__(self, adapter: Any):
        if not adapter.is_multimodal:
            raise ValueError(f"{adapter.family} is a text LM; train it on --text-file (the passkey recipe)")
        self.adapter = adapter

    def conversation(self, qa: Sequence[QA]) -> tuple[str, str, list[tuple[int, int]]]:
        """(prefix text up to the first assistant turn, the rest, answer-word spans in the rest)."""
        processor = self.adapter.processor
        first = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": qa[0].question}]}]
        messages = list(first)
        for k, turn in enumerate(qa):
            if k:
                messages.append({"role": "user", "content": [{"type": "text", "text": turn.question}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
        prefix = processor.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
        full = processor.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prefix):
            raise ValueError(f"the chat template of {self.adapter.family} renders a conversation that does not start "
                             "with its own first turn; cannot teacher-force the answers")
        rest, spans, cursor = full[len(prefix):], [], 0
        for turn in qa:
            start = rest.index(turn.answer, cursor)
            spans += [(start + a, start + b) for a, b in turn.answer_spans]
            cursor = start + len(turn.answer)
        return prefix, rest, spans

    def encode(self, frames: np.ndarray, fps: float, qa: Sequence[QA]) -> Example:
        """A video and its question/answer turns as one teacher-forced example."""
        adapter = self.adapter
        prefix, rest, spans = self.conversation(qa)
        inputs = dict(adapter.process(prefix, frames, fps))
        encoded = adapter.tokenizer(rest, add_special_tokens=False, return_offsets_mapping=True)
        rest_ids = torch.tensor([encoded["input_ids"]], device=adapter.device)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in inputs:  # text continues after the video: ids, mask 1, token type 0 (text)
                tail = rest_ids if key == "input_ids" else torch.full_like(rest_ids, key == "attention_mask")
                inputs[key] = torch.cat([inputs[key], tail.to(inputs[key].dtype)], dim=1)
        embedded = adapter.embed_prefix(inputs)
        answer = torch.cat([torch.zeros(inputs["input_ids"].shape[1] - rest_ids.shape[1], dtype=torch.bool),
                            answer_token_mask(encoded["offset_mapping"], spans)])
        return Example(embedded.inputs_embeds, embedded.position_ids, answer.to(adapter.device), inputs["input_ids"],
                       adapter.chunk_inputs(embedded, 0, embedded.num_tokens))


class VideoNeedleData(ChatExamples):
    """The synthesizer's training variant, one sample per index."""

    def __init__(self, adapter: Any, config: TrainingConfig):
        super().__init__(adapter)
        self.generator = TrainingGenerator(config)

    def example(self, index: int) -> Example:
        sample = self.generator.sample(index)
        return self.encode(sample.frames, sample.fps, sample.qa)


# The official recipe's constants (mit-han-lab/duo-attention: scripts/train.sh).
NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
        "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
        "whiskey", "xray", "yankee", "zulu")
NUM_PASSKEYS = 10
PASSKEY_WORDS = 32
CONTEXT_INTERVALS = 50
DEPTH_RANGE = (0.05, 0.95)
DEPTH_INTERVALS = 1000
CONTEXT_OPEN = "<|im_start|> This is a very long story book: <book> "
CONTEXT_CLOSE = " </book>.\n\n"
NEEDLE = "Remeber this sequence of words, it's the {} passkey to the vault: "
SEPARATOR = "\n\n"
QUESTION = "Based on the content of the book, what is the {} passkey to the vault?\nPasskey: "
# The official ORDINAL_NUMBERS: words, so at most 20 passkeys.
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth")
# Tokens kept free below --context-max: the official loader trims the haystack to context_max - 300 - the
# prompt, needles and questions (duo_attn/data.py, `buffer_size`), so no sequence exceeds context_max.
BUFFER_TOKENS = 300


class PasskeyData:
    """The official multi-passkey retrieval samples over a user-supplied haystack text.

    As the official loader encodes them: the opening text with the tokenizer's special tokens (BOS for
    Llama-family tokenizers, nothing for Qwen's), everything else without, each piece on its own — so a
    passkey is the same tokens in its needle and in its answer; the haystack trimmed once so that
    haystack + opening + needles + questions + answers + BUFFER_TOKENS fit in `context_max`.
    """

    def __init__(self, adapter: Any, text_file: str | Path, context_min: int = 1000, context_max: int = 32000,
                 num_passkeys: int = NUM_PASSKEYS, passkey_words: int = PASSKEY_WORDS, seed: int = 0):
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: haystack text file not found; pass any long plain-text file")
        if not 0 < context_min <= context_max:
            raise ValueError(f"need 0 < context_min <= context_max, got {context_min}, {context_max}")
        if not 0 < num_passkeys <= len(ORDINALS):
            raise ValueError(f"need 1 to {len(ORDINALS)} passkeys (the official ordinal words), got {num_passkeys}")
        self.adapter, self.seed = adapter, seed
        self.num_passkeys, self.passkey_words = num_passkeys, passkey_words
        tokenizer = adapter.tokenizer
        self.haystack = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(self.haystack) < context_max:
            raise ValueError(f"{path}: {len(self.haystack)} tokens, but --context-max is {context_max}; "
                             "pass a longer text or a smaller --context-max")
        self.lengths = np.linspace(context_min, context_max, CONTEXT_INTERVALS).astype(int)
        self.depths = np.linspace(*DEPTH_RANGE, DEPTH_INTERVALS)
        self.open_tokens = tokenizer(CONTEXT_OPEN, add_special_tokens=True)["input_ids"]
        # The rest of a sequence at its longest: every needle and question, each passkey (twice) as long
        # as its longest-tokenizing words make it (the official loader counts one random passkey).
        passkey = (max(len(self._tokens(word)) for word in NATO)
                   + (passkey_words - 1) * max(len(self._tokens(" " + word)) for word in NATO))
        separator = len(self._tokens(SEPARATOR))
        rest = len(self.open_tokens) + len(self._tokens(CONTEXT_CLOSE)) + sum(
            len(self._tokens(NEEDLE.format(ORDINALS[k]))) + len(self._tokens(QUESTION.format(ORDINALS[k])))
            + 2 * passkey + 3 * separator for k in range(num_passkeys))
        if context_max - BUFFER_TOKENS - rest < context_min:
            raise ValueError(f"--context-max {context_max} leaves {context_max - BUFFER_TOKENS - rest} haystack tokens "
                             f"after the prompt, {num_passkeys} needles and questions ({rest} tokens) and the "
                             f"{BUFFER_TOKENS}-token buffer, fewer than --context-min {context_min}; raise --context-max")
        self.haystack = self.haystack[:context_max - BUFFER_TOKENS - rest]

    def _tokens(self, text: str) -> list[int]:
        return self.adapter.tokenizer(text, add_special_tokens=False)["input_ids"]

    def example(self, index: int) -> Example:
        epoch, slot = divmod(index, len(self.lengths))
        # The official loader shuffles the 50 lengths each pass; here a seeded permutation per pass.
        length = int(self.lengths[np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))[slot]])
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        passkeys = [self._tokens(" ".join(rng.choice(NATO, self.passkey_words))) for _ in range(self.num_passkeys)]
        separator = self._tokens(SEPARATOR)
        depths = np.sort(rng.choice(self.depths, self.num_passkeys, replace=False))
        haystack = self.haystack[:length]
        context, start = [], 0
        for k, (depth, passkey) in enumerate(zip(depths, passkeys)):
            cut = int(depth * len(haystack))
            context += haystack[start:cut] + separator + self._tokens(NEEDLE.format(ORDINALS[k])) + passkey + separator
            start = cut
        context += haystack[start:]
        pieces = [(self.open_tokens + context + self._tokens(CONTEXT_CLOSE), False)]
        for k, passkey in enumerate(passkeys):
            pieces += [(self._tokens(QUESTION.format(ORDINALS[k])), False), (passkey, True), (separator, False)]
        ids = torch.tensor([[t for tokens, _ in pieces for t in tokens]], device=self.adapter.device)
        answer = torch.tensor([is_answer for tokens, is_answer in pieces for _ in tokens], dtype=torch.bool)
        with torch.no_grad():
            embeds = self.adapter.model.get_input_embeddings()(ids)
        return Example(embeds, self.adapter.positions(0, ids.shape[1]), answer.to(self.adapter.device), ids)
