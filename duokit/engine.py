"""The evaluation engine: per sample, prefill the shared video prefix once, then answer each try.

For one VNBench sample: decode the frames once, build the prefix (system turn + video) through the
real processor, embed it (vision tower once), let the method transform it, prefill it in chunks into
the method's cache, then for each of the 4 tries deep-copy the prefilled cache, append only that try's
suffix (question + options + assistant header) and decode greedily (official max_new_tokens=5,
vnbench.md §6). Positions are passed explicitly on every step (M-RoPE for Qwen-VL), so the engine's
tokens equal `model.generate` on the full prompt (tests/test_engine.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duokit.metrics import PeakMemory, Stopwatch, kv_cache_bytes
from duokit.models.base import Prefix

MAX_NEW_TOKENS = 5  # the official LLaVA example decodes greedily with max_new_tokens=5 (vnbench.md §6)
DEFAULT_CHUNK_SIZE = 2048  # prefill chunk (tokens): bounds attention-score memory on long videos


class NonFiniteLogits(RuntimeError):
    """The model produced NaN/inf logits (e.g. Qwen-VL overflowing in float16): argmax would be arbitrary."""


@dataclass
class TryAnswer:
    tokens: list[int]
    text: str
    decode_s: float


@dataclass
class SampleAnswers:
    answers: list[TryAnswer]
    cost: dict[str, Any] = field(default_factory=dict)


def new_cache(model: Any, adapter: Any, method: Any) -> Any:
    from transformers import DynamicCache

    cache = method.new_cache(model, adapter)
    return DynamicCache(config=adapter.text_config) if cache is None else cache


@torch.no_grad()
def prefill(adapter: Any, prefix: Prefix, cache: Any, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Any:
    """Run the prefix through the language model in chunks of `chunk_size` tokens, filling `cache`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, prefix.num_tokens, chunk_size):
        end = min(start + chunk_size, prefix.num_tokens)
        adapter.language_model(inputs_embeds=prefix.inputs_embeds[:, start:end],
                               position_ids=prefix.position_ids[..., start:end],
                               past_key_values=cache, use_cache=True,
                               **adapter.chunk_inputs(prefix, start, end))
    return cache


@torch.no_grad()
def greedy_decode(adapter: Any, cache: Any, prefix: Prefix, suffix_ids: torch.Tensor,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Append `suffix_ids` (1, n) to the `prefix` prefilled in `cache`; decode greedily until an EOS token.

    The suffix and then each new token continue one position after another from `prefix.next_position`.
    """
    eos = adapter.eos_token_ids
    tokens: list[int] = []
    step_ids, position = suffix_ids, prefix.next_position
    for _ in range(max_new_tokens):
        count = step_ids.shape[1]
        hidden = adapter.language_model(input_ids=step_ids, position_ids=adapter.positions(position, count),
                                        past_key_values=cache, use_cache=True).last_hidden_state
        logits = adapter.lm_head(hidden[:, -1]).float()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogits(f"NaN/inf logits at decoding step {len(tokens) + 1} of a {hidden.dtype} model; "
                                  "run in bfloat16 or float32 (--dtype)")
        token = int(logits.argmax(-1))
        tokens.append(token)
        position += count
        if token in eos:
            break
        step_ids = torch.tensor([[token]], device=suffix_ids.device)
    return tokens


def answer_tries(model: Any, adapter: Any, method: Any, frames: np.ndarray | None, fps: float | None,
                 prompts: list[str], context: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> SampleAnswers:
    """Answer `prompts` (the tries) about one shared prefix: the video `frames` and/or a text `context`.

    Must run inside `with method.apply(model, adapter):`. Returns the answers and the sample's costs.
    """
    device = model.device
    vision, prefill_watch = Stopwatch(device), Stopwatch(device)
    memory = PeakMemory(str(device))
    with memory.measure():
        with vision:
            inputs = adapter.build_prefix(frames, fps, context)
            prefix = adapter.embed_prefix(inputs)
        input_video_tokens = prefix.num_video_tokens
        prefix = method.prepare_prefix(prefix, model, adapter)
        with prefill_watch:
            cache = prefill(adapter, prefix, new_cache(model, adapter, method), chunk_size)
        kv_bytes = kv_cache_bytes(cache)
        answers = []
        for prompt in prompts:
            suffix = adapter.suffix_ids(prompt, frames is not None, context)
            with Stopwatch(device) as decode:
                tokens = greedy_decode(adapter, copy.deepcopy(cache), prefix, suffix, max_new_tokens)
            text = adapter.tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(TryAnswer(tokens, text, decode.seconds))
    new_tokens = sum(len(a.tokens) for a in answers)
    cost = {
        "frames": 0 if frames is None else len(frames),
        "input_video_tokens": input_video_tokens,
        "video_tokens": prefix.num_video_tokens,
        "prefix_tokens": prefix.num_tokens,
        "kv_bytes": kv_bytes,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_growth_bytes": memory.growth_bytes,
        "peak_memory_exact": memory.exact,
        "vision_s": vision.seconds,
        "prefill_s": prefill_watch.seconds,
        # Each try's first step also runs its suffix; that time counts as decoding, as in generate.
        "decode_s_per_token": sum(a.decode_s for a in answers) / max(new_tokens, 1),
    }
    return SampleAnswers(answers, cost)


# ---------------------------------------------------------------------------------------------
# VNBench samples.

def sampled_fps(timestamps: np.ndarray, source_fps: float) -> float:
    """Frames per video second of uniformly sampled frames (the source fps for a single frame)."""
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        return (len(timestamps) - 1) / float(timestamps[-1] - timestamps[0])
    return float(source_fps)


def evaluate_sample(model: Any, adapter: Any, method: Any, sample: Any, video_dir: str | Path,
                    num_frames: int, parser: str = "official", chunk_size: int = DEFAULT_CHUNK_SIZE,
                    max_new_tokens: int = MAX_NEW_TOKENS,
                    skip: set[str] | frozenset = frozenset()) -> list[dict]:
    """Prediction records (duokit.data.scoring) for the tries of `sample` not in `skip` (record ids).

    A video that cannot be found or decoded, a sample that runs out of GPU memory, or NaN/inf logits give
    records with `error` set (scored as wrong, counted in n_errors) instead of stopping the run.
    """
    from duokit.data.scoring import prediction_record
    from duokit.data.video import VideoError, load_frames, needle_coverage
    from duokit.data.vnbench import resolve_video

    tries = [record for record in sample.tries if record.record_id not in skip]
    if not tries:
        return []
    try:
        video = load_frames(resolve_video(sample.video_name, video_dir), num_frames=num_frames)
        result = answer_tries(model, adapter, method, video.frames,
                              sampled_fps(video.timestamps, video.fps), [record.prompt for record in tries],
                              chunk_size=chunk_size, max_new_tokens=max_new_tokens)
    except (VideoError, OSError, torch.OutOfMemoryError, NonFiniteLogits) as err:
        if isinstance(err, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        error = f"{type(err).__name__}: {err}"
        return [prediction_record(record, None, parser, error=error) for record in tries]
    coverage = needle_coverage(sample.needle_time, video.timestamps)
    cost = {**result.cost, "needle_frames": list(coverage.frames_per_needle),
            "needles_missed": len(coverage.missed)}
    return [prediction_record(record, answer.text, parser, output_tokens=answer.tokens,
                              cost={**cost, "decode_s": answer.decode_s})
            for record, answer in zip(tries, result.answers)]
