"""The evaluation engine: per sample, prefill the shared video prefix once, then answer each try.

For one sample: build the prefix (system turn + video) through the real processor, embed it (vision
tower once), let the method transform it, let the method prefill it (by default in chunks) into the
method's cache, then for each try restore the prefilled state (`Method.prefix_restorer`: in place by
truncation for the default preallocated cache, no copy of the prefix), append only that try's suffix
(question + options + assistant header) and decode greedily (the official VNBench evaluation decodes
max_new_tokens=5). Positions are passed explicitly on every step (M-RoPE for Qwen-VL), so the engine's
tokens equal `model.generate` on the full prompt (tests/test_engine.py). A method whose prefix depends
on the question (`Method.prefix_depends_on_question`) gets one prefix per distinct question, which then
ends with that question.

The engine knows no method: it calls the hooks of `duokit.methods.base.Method` and measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from duokit.decode_together import decode_tries_together, full_attention_only, together_kv_tokens
from duokit.metrics import PeakMemory, Stopwatch, kv_cache_bytes
from duokit.models.base import Geometry, Prefix, TokenCounts

MAX_NEW_TOKENS = 5  # the official LLaVA example of VNBench decodes greedily with max_new_tokens=5
DEFAULT_CHUNK_SIZE = 2048  # prefill chunk (tokens): bounds attention-score memory on long videos


@dataclass(frozen=True)
class SampleInput:
    """What a method sees of a sample: the sampled `frames` (uint8 [T, H, W, 3], None for text-only)
    at `fps` frames per video second, an optional text `context`, and `question`, the part of the try
    prompts the tries share ("" unless the method's prefix depends on the question)."""

    frames: np.ndarray | None
    fps: float | None
    context: str | None = None
    question: str = ""


@dataclass(frozen=True)
class Try:
    """One try: its full `prompt`, which starts with `question`, the part shared by the tries of the
    same question (VNBench: the question line; the options differ from try to try)."""

    prompt: str
    question: str = ""


class NonFiniteLogits(RuntimeError):
    """The model produced NaN/inf logits (e.g. Qwen-VL overflowing in float16): argmax would be arbitrary."""


@dataclass
class TryAnswer:
    tokens: list[int]
    text: str
    decode_s: float
    logits: torch.Tensor | None = None  # (steps, vocab) float32, when asked for


@dataclass
class SampleAnswers:
    answers: list[TryAnswer]
    cost: dict[str, Any] = field(default_factory=dict)


class LM:
    """The language model as the engine and the methods drive it, built from (model, adapter).

    `forward` runs one step through the decoder stack with explicit positions and records the KV
    bytes the cache holds after it (`kv_bytes_peak`, reset per sample); `prefill` fills a cache chunk
    by chunk. A method that owns its prefill runs the model through these two, so its peak is measured.
    """

    def __init__(self, model: Any, adapter: Any):
        self.model, self.adapter = model, adapter
        self.kv_bytes_peak = 0
        # Tokens any try may add to a prefilled cache (longest suffix + max_new_tokens); the engine sets
        # it per prefix, before `Method.new_cache`, which may preallocate them.
        self.decode_reserve = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def geometry(self) -> Geometry:
        return self.adapter.geometry

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers (for forward pre-hooks)."""
        return self.adapter.decoder_layers

    @property
    def rotary(self) -> torch.nn.Module:
        """The rotary embedding: `lm.rotary(hidden, position_ids)` -> (cos, sin) for any positions."""
        return self.adapter.language_model.rotary_emb

    def embed(self, sample: SampleInput) -> Prefix:
        """The sample's shared prefix through the real processor, embedded (the vision tower runs here)."""
        inputs = self.adapter.build_prefix(sample.frames, sample.fps, sample.context, sample.question)
        return self.adapter.embed_prefix(inputs)

    @torch.no_grad()
    def forward(self, cache: Any, position_ids: torch.Tensor, *, inputs_embeds: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        """Hidden states `(1, n, hidden)` of one step; `extra` goes to the language model (and from there
        to the attention functions and hooks: masks, deepstack rows, a method's own keywords)."""
        hidden = self.adapter.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                             position_ids=position_ids, past_key_values=cache, use_cache=True,
                                             **extra).last_hidden_state
        self.kv_bytes_peak = max(self.kv_bytes_peak, kv_cache_bytes(cache))
        return hidden

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits `(vocab,)` of the last position (only it is projected)."""
        return self.adapter.lm_head(hidden[:, -1]).float()[0]

    @torch.no_grad()
    def prefill(self, prefix: Prefix, cache: Any, chunk_size: int = DEFAULT_CHUNK_SIZE,
                bounds: Sequence[int] | None = None,
                chunk_kwargs: Callable[[int, int], dict[str, Any]] | None = None) -> Any:
        """Run `prefix` through the language model into `cache`, chunk by chunk.

        Chunks end at `bounds` (increasing, the last = the prefix length), by default every `chunk_size`
        tokens. `chunk_kwargs(start, end)` gives extra inputs for a chunk (a 4-D mask, a BlockMask, a
        method's own keywords); they are merged over the family's own per-chunk inputs.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        length = prefix.num_tokens
        ends = list(range(chunk_size, length, chunk_size)) + [length] if bounds is None else list(bounds)
        if not ends or ends[-1] != length or any(b <= a for a, b in zip([0, *ends], ends)):
            raise ValueError(f"prefill bounds must increase from above 0 to the prefix length {length}, got {ends}")
        for start, end in zip([0, *ends], ends):
            extra = self.adapter.chunk_inputs(prefix, start, end)
            if chunk_kwargs is not None:
                extra = {**extra, **chunk_kwargs(start, end)}
            self.forward(cache, prefix.position_ids[..., start:end], inputs_embeds=prefix.inputs_embeds[:, start:end],
                         **extra)
        return cache


@torch.no_grad()
def greedy_decode(lm: LM, cache: Any, prefix: Prefix, suffix_ids: torch.Tensor,
                  max_new_tokens: int = MAX_NEW_TOKENS, logits: list | None = None) -> list[int]:
    """Append `suffix_ids` (1, n) to the `prefix` prefilled in `cache`; decode greedily until an EOS token.

    The suffix and then each new token continue one position after another from `prefix.next_position`.
    Each step's logits are appended to `logits` when given.
    """
    eos = lm.adapter.eos_token_ids
    tokens: list[int] = []
    step_ids, position = suffix_ids, prefix.next_position
    for _ in range(max_new_tokens):
        count = step_ids.shape[1]
        hidden = lm.forward(cache, lm.adapter.positions(position, count), input_ids=step_ids)
        step_logits = lm.next_token_logits(hidden)
        if logits is not None:
            logits.append(step_logits)
        if not torch.isfinite(step_logits).all():
            raise NonFiniteLogits(f"NaN/inf logits at decoding step {len(tokens) + 1} of a {hidden.dtype} "
                                  "model; run in bfloat16 or float32 (--dtype)")
        token = int(step_logits.argmax(-1))
        tokens.append(token)
        position += count
        if token in eos:
            break
        step_ids = torch.tensor([[token]], device=suffix_ids.device)
    return tokens


@contextmanager
def count_layer_tokens(layers: Sequence[torch.nn.Module]) -> Iterator[list[int]]:
    """Within the block, `counts[l]` adds up the tokens (hidden-state rows) entering decoder layer l."""
    counts = [0] * len(layers)

    def counter(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            counts[index] += hidden.shape[1]
        return hook

    handles = [layer.register_forward_pre_hook(counter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def answer_tries(lm: LM, method: Any, sample: SampleInput, tries: Sequence[Try | str],
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
                 keep_logits: bool = False, tries_together: bool = True) -> SampleAnswers:
    """Answer `tries` (a `Try`, or a prompt string) about one shared prefix: `sample`'s video and/or
    text context. Must run inside `with method.apply(lm.model, lm.adapter):`. Returns the answers (with
    each step's logits if `keep_logits`) and the sample's costs (docs/metrics.md). `tries_together=False`
    decodes the tries one by one even where the method could batch them (same tokens; one suffix held at
    a time, as every method that cannot batch them holds it).
    """
    method.check_applied(lm.model)
    tries = [t if isinstance(t, Try) else Try(t) for t in tries]
    groups: dict[str, list[int]] = {}
    for index, one_try in enumerate(tries):  # one prefix per question, or one for all
        groups.setdefault(one_try.question if method.prefix_depends_on_question else "", []).append(index)
    answers: list[TryAnswer | None] = [None] * len(tries)
    costs = []
    memory = PeakMemory(str(lm.device))
    with memory.measure():
        for question, indices in groups.items():
            view = replace(sample, question=question)
            group_answers, cost = _answer_group(lm, method, view, [tries[i] for i in indices], chunk_size,
                                                max_new_tokens, keep_logits, tries_together)
            for index, answer in zip(indices, group_answers):
                answers[index] = answer
            costs.append(cost)
    cost = {key: sum(c[key] for c in costs) if key in ADDITIVE_COSTS else max(c[key] for c in costs)
            for key in costs[0]}
    new_tokens = sum(len(a.tokens) for a in answers)
    cost.update({
        "frames": 0 if sample.frames is None else len(sample.frames),
        "prefills": len(groups),
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_growth_bytes": memory.growth_bytes,
        "peak_memory_exact": memory.exact,
        # Each try's first step also runs its suffix; that time counts as decoding, as in generate.
        "decode_s_per_token": sum(a.decode_s for a in answers) / max(new_tokens, 1),
    })
    return SampleAnswers(answers, cost)


# Costs that add up over a sample's prefills (one per question); the others are maxima.
ADDITIVE_COSTS = ("vision_s", "prefill_s", "attention_flops", "mlp_flops", "visual_token_layers",
                  "tokens_per_layer_total")


def _answer_group(lm: LM, method: Any, sample: SampleInput, tries: list[Try], chunk_size: int,
                  max_new_tokens: int, keep_logits: bool,
                  tries_together: bool) -> tuple[list[TryAnswer], dict[str, Any]]:
    """The tries sharing one prefix: embed, prepare, prefill once, then each try on the restored prefix."""
    vision, prefill_watch = Stopwatch(lm.device), Stopwatch(lm.device)
    lm.kv_bytes_peak = 0
    with vision:
        prefix = lm.embed(sample)
    built = prefix.token_counts  # as the adapter built it, before the method acted
    prefix = method.prepare_prefix(prefix, sample, lm)
    with_video = sample.frames is not None
    suffixes = [lm.adapter.suffix_ids(t.prompt, with_video, sample.context, sample.question) for t in tries]
    together = (tries_together and method.decodes_tries_together and not keep_logits and len(suffixes) > 1
                and full_attention_only(lm.adapter.text_config))
    # Decoded together, the tries write into the batch's own buffers, not after the prefilled prefix.
    lm.decode_reserve = 0 if together else max(suffix.shape[1] for suffix in suffixes) + max_new_tokens
    cache = method.new_cache(lm, prefix)
    with prefill_watch, count_layer_tokens(lm.layers) as tokens_per_layer:
        cache = method.prefill(lm, prefix, cache, chunk_size)
    kv_bytes = kv_cache_bytes(cache)
    restore = method.prefix_restorer(cache)
    answers, longest_try = [], 0
    if together:
        # One batch over the shared prefix (equal tokens; logits equal up to rounding, hence not with keep_logits).
        with Stopwatch(lm.device) as decode:
            all_tokens = decode_tries_together(lm, cache, prefix, suffixes, max_new_tokens)
        longest_try = together_kv_tokens(suffixes, max_new_tokens)  # held beside the prefix
        for tokens in all_tokens:
            text = lm.adapter.tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(TryAnswer(tokens, text, decode.seconds / len(suffixes)))
    else:
        for suffix in suffixes:
            logits: list | None = [] if keep_logits else None
            with Stopwatch(lm.device) as decode:
                tokens = greedy_decode(lm, restore(), prefix, suffix, max_new_tokens, logits)
            # The cache saw the suffix and every generated token but the last (never fed back).
            longest_try = max(longest_try, suffix.shape[1] + len(tokens) - 1)
            text = lm.adapter.tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(TryAnswer(tokens, text, decode.seconds, torch.stack(logits) if keep_logits else None))
    geometry = lm.geometry
    at_peak = TokenCounts(built.text + longest_try, built.video, built.video_grids)
    text_tokens = prefix.num_tokens - prefix.num_video_tokens
    cost = {
        "input_video_tokens": built.video,
        "video_tokens": prefix.num_video_tokens,
        "prefix_tokens": prefix.num_tokens,
        "kv_bytes": kv_bytes,
        "kv_bytes_peak": lm.kv_bytes_peak,
        "kv_bytes_planned": method.estimate_sample_kv_bytes(geometry, at_peak, prefix),
        "tokens_per_layer": tokens_per_layer,
        "tokens_per_layer_total": sum(tokens_per_layer),
        # Methods act on video tokens: what a layer ran on beyond the prefix's text tokens is video.
        "visual_token_layers": sum(max(0, n - text_tokens) for n in tokens_per_layer),
        **method.estimate_prefill_flops(geometry, tokens_per_layer, prefix.token_counts),
        "vision_s": vision.seconds,
        "prefill_s": prefill_watch.seconds,
        **prefix.costs,
    }
    return answers, cost
