"""Cost metrics: KV-cache bytes, peak memory, timers, and the memory planner.

Definitions are in docs/metrics.md. `kv_cache_bytes` counts what a cache really holds, so a method's
custom cache layer is measured truthfully as long as it keeps its tensors as attributes (plain
tensors, or lists/tuples of tensors).
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Self

import torch

PROC_STATUS = "/proc/self/status"
PROC_MEMINFO = "/proc/meminfo"
PROC_CLEAR_REFS = "/proc/self/clear_refs"
# Writing "5" to clear_refs resets the peak RSS (VmHWM) of this process (Linux >= 4.0, proc(5)).
RESET_PEAK_RSS = "5"
DEFAULT_FRAME_SIZE = (360, 640)  # (height, width) assumed when the planner is not told the video size


def kv_cache_bytes(cache: Any) -> int:
    """Sum of `nbytes` of every tensor attribute (also in lists/tuples) of every layer in `cache.layers`."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            total += sum(item.nbytes for item in items if isinstance(item, torch.Tensor))
    return total


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings measure the work, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`with watch: ...` adds the (device-synchronized) wall time of the block to `watch.seconds`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Self:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def _proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` value of a /proc file (/proc/self/status, /proc/meminfo), or None."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open(PROC_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write(RESET_PEAK_RSS)
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS; it never resets.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class PeakMemory:
    """Peak memory of a block. On CUDA: `max_memory_allocated` after `reset_peak_memory_stats` (absolute
    bytes, weights included) and its growth over the bytes allocated at the start. On CPU: peak RSS
    growth, from VmHWM after resetting it through /proc/self/clear_refs; where that is unavailable, from
    `ru_maxrss`, which never resets, so the growth is 0 unless the block sets a new process-wide peak
    (`exact` is then False).
    """

    device: str
    peak_bytes: int = 0
    growth_bytes: int = 0
    exact: bool = True

    @contextmanager
    def measure(self):
        device = torch.device(self.device)
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            yield self
            synchronize(device)
            self.peak_bytes = torch.cuda.max_memory_allocated(device)
            self.growth_bytes = self.peak_bytes - start
            return
        self.exact = _reset_peak_rss() and _proc_kib(PROC_STATUS, "VmHWM") is not None
        start = _proc_kib(PROC_STATUS, "VmRSS") * 1024 if self.exact else _max_rss_bytes()
        yield self
        self.peak_bytes = _proc_kib(PROC_STATUS, "VmHWM") * 1024 if self.exact else _max_rss_bytes()
        self.growth_bytes = max(0, self.peak_bytes - start)


# ---------------------------------------------------------------------------------------------
# The memory planner.

@dataclass
class MemoryPlan:
    weights_bytes: int
    kv_bytes: int  # the prefilled prefix cache + the try's copy with its suffix and answer
    activation_bytes: int
    prefix_tokens: int
    video_tokens: int
    available_bytes: int | None  # GPU memory (or available RAM on CPU); None when unknown
    vision_bytes: int = 0  # the vision tower's transient activations, before the prefill (none of its KV)
    attention_kernel: str = "math"  # what the language model's attention materialises (attention_kernel)

    @property
    def total_bytes(self) -> int:
        # The vision tower runs and frees its activations before the first prefill chunk.
        return self.weights_bytes + max(self.vision_bytes, self.kv_bytes + self.activation_bytes)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= self.available_bytes

    def to_json(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}

    def describe(self) -> str:
        where = "unknown" if self.available_bytes is None else format_bytes(self.available_bytes)
        return (f"memory plan: weights {format_bytes(self.weights_bytes)} + max(vision tower "
                f"~{format_bytes(self.vision_bytes)}, KV {format_bytes(self.kv_bytes)} + activations "
                f"~{format_bytes(self.activation_bytes)}) = {format_bytes(self.total_bytes)} (prefix "
                f"{self.prefix_tokens} tokens, {self.video_tokens} video; {self.attention_kernel} attention); "
                f"available {where}")


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def dtype_bytes(model: Any) -> int:
    return torch.finfo(model.dtype).bits // 8


def planned_kv_bytes(adapter: Any, method: Any, tokens: Any) -> int:
    """KV bytes `method` keeps at its peak for `tokens` (`duokit.models.TokenCounts`) on `adapter`'s model."""
    return method.estimate_kv_bytes(adapter.geometry, tokens)


def available_memory_bytes(device: torch.device | str) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":  # None when planning a GPU run on a machine without one
        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    kib = _proc_kib(PROC_MEMINFO, "MemAvailable")
    return None if kib is None else kib * 1024


def attention_kernel(implementation: str, device: torch.device | str) -> str:
    """What an attention implementation runs as: "flash" (flash-attn 2), "efficient" (sdpa on CUDA picks
    the flash or memory-efficient kernel, masks included; neither materialises the scores) or "math"
    (eager attention, and the planner's bound on CPU, where the scores may be materialised)."""
    if implementation == "flash_attention_2":
        return "flash"
    if implementation == "eager" or torch.device(device).type != "cuda":
        return "math"
    return "efficient"  # sdpa, and duokit's own functions, which call sdpa


def vision_activation_bytes(vision_config: Any, patches: int, group: int, input_dim: int, size: int,
                            kernel: str) -> int:
    """Transient memory of one no-grad vision-tower pass over `patches` patches: the fp32 pixel input and
    its cast, ~8 hidden-size and 3 intermediate-size buffers per patch (residual, norm, q/k/v with their
    rotary copies, attention output; MLP gate/up/product) and, under the math kernel, the fp32 scores and
    softmax of the largest attention group (`group` patches, all heads)."""
    if not patches:
        return 0
    hidden = getattr(vision_config, "embed_dim", None) or vision_config.hidden_size
    intermediate = getattr(vision_config, "intermediate_size", None) or hidden * getattr(vision_config,
                                                                                          "mlp_ratio", 4)
    heads = getattr(vision_config, "num_heads", None) or vision_config.num_attention_heads
    scores = 2 * heads * group * group * 4 if kernel == "math" else 0
    return patches * input_dim * (4 + size) + patches * (8 * hidden + 3 * int(intermediate)) * size + scores


def plan_memory(model: Any, adapter: Any, method: Any, num_frames: int,
                frame_height: int = DEFAULT_FRAME_SIZE[0], frame_width: int = DEFAULT_FRAME_SIZE[1],
                chunk_size: int | None = None, suffix_tokens: int = 256, max_new_tokens: int | None = None,
                device: torch.device | str | None = None, tries: int = 4) -> MemoryPlan:
    """Estimate the memory of evaluating one sample: weights + KV + activations.

    The prefix token count is exact: the real processor runs on `num_frames` black frames of the given
    size with the adapter's pixel limits (default: an assumed 640x360; `duokit eval` passes the largest
    video's size). Activations are an upper-bound heuristic for one prefill chunk: attention scores
    (fp32) only where the kernel materialises them (`attention_kernel`), the MLP's intermediate states
    and a few hidden-size buffers, plus the prefix embeddings. The vision tower's transient activations
    (`vision_activation_bytes`) come before the prefill (docs/metrics.md). `device` (default: the
    model's) decides the kernels and the memory available: a GPU run can be planned on the meta device.
    `tries` (VNBench: 4 option orders per question) counts for a method that decodes them together.
    """
    import numpy as np

    from duokit.engine import DEFAULT_CHUNK_SIZE, MAX_NEW_TOKENS
    from duokit.models.base import TokenCounts

    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    frames = None
    if adapter.is_multimodal:
        frames = np.zeros((num_frames, frame_height, frame_width, 3), dtype=np.uint8)
    inputs = adapter.build_prefix(frames, fps=1.0)
    prefix_tokens = int(inputs["input_ids"].shape[1])
    video_tokens = int(adapter.video_mask(inputs["input_ids"]).sum())
    size = dtype_bytes(model)
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    try_tokens = prefix_tokens + suffix_tokens + max_new_tokens
    prefix_counts = TokenCounts(prefix_tokens - video_tokens, video_tokens, adapter.video_grids(inputs))
    from duokit.decode_together import full_attention_only

    together = method.decodes_tries_together and full_attention_only(adapter.text_config)
    held = prefix_tokens + (tries if together else 1) * (suffix_tokens + max_new_tokens)
    try_counts = TokenCounts(held - video_tokens, video_tokens, prefix_counts.video_grids)
    # One cache per sample: each try restores the prefix in place (plus what the method keeps to do so),
    # or the tries decode together, each with its own suffix buffer beside the one prefix.
    kv = planned_kv_bytes(adapter, method, try_counts) + method.estimate_restore_kv_bytes(
        adapter.geometry, prefix_counts, suffix_tokens + max_new_tokens)
    config = adapter.text_config
    chunk = min(chunk_size, prefix_tokens)
    device = model.device if device is None else torch.device(device)
    kernel = attention_kernel(config._attn_implementation, device)
    scores = chunk * try_tokens * adapter.num_heads * 4 if kernel == "math" else 0
    mlp = chunk * config.intermediate_size * 3 * size
    hidden = chunk * config.hidden_size * 8 * size
    embeds = prefix_tokens * config.hidden_size * size
    logits = config.vocab_size * 4  # the engine projects only the last position, in fp32 for argmax
    vision = 0
    patches, group = adapter.vision_sequence(inputs)
    if patches:
        vision_config = model.config.vision_config
        pixels = inputs["pixel_values_videos"]
        input_dim = pixels.shape[-1] if pixels.dim() == 2 else pixels[0, 0].numel() // group
        vision_kernel = attention_kernel(vision_config._attn_implementation, device)
        vision = embeds + vision_activation_bytes(vision_config, patches, group, input_dim, size, vision_kernel)
    return MemoryPlan(weights_bytes=weights, kv_bytes=kv,
                      activation_bytes=scores + mlp + hidden + embeds + logits,
                      prefix_tokens=prefix_tokens, video_tokens=video_tokens,
                      available_bytes=available_memory_bytes(device), vision_bytes=vision,
                      attention_kernel=kernel)


def warn_if_too_big(plan: MemoryPlan) -> bool:
    """Warn (and return False) when the planned memory exceeds what the device has."""
    if plan.fits:
        return True
    warnings.warn(f"this run will probably not fit: {plan.describe()}. Use fewer --frames, a smaller model, "
                  "a smaller --chunk-size or a method that keeps less KV.", stacklevel=2)
    return False
