"""Cost metrics: KV bytes of real and custom caches, the memory planner, peak memory, timers."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

from duokit.engine import LM
from duokit.methods import get_method
from duokit.metrics import MemoryPlan, Stopwatch, kv_cache_bytes, plan_memory, warn_if_too_big
from duokit.models import load_vlm


@pytest.fixture(scope="module")
def qwen():
    return load_vlm("tiny:qwen2_5_vl")


def prefilled(model, adapter, video, method, context=None):
    lm = LM(model, adapter)
    prefix = adapter.embed_prefix(adapter.build_prefix(video, None if video is None else 1.0, context))
    return prefix, lm.prefill(prefix, method.new_cache(lm, prefix), chunk_size=32)


@pytest.mark.parametrize("name", ["tiny:qwen2_5_vl", "tiny:llama"])
def test_kv_estimate_equals_measured_bytes(name):
    model, _, adapter = load_vlm(name)
    method = get_method("baseline")
    video = np.zeros((8, 64, 64, 3), dtype=np.uint8) if adapter.is_multimodal else None
    prefix, cache = prefilled(model, adapter, video, method, None if adapter.is_multimodal else "some text " * 20)
    estimate = method.estimate_kv_bytes(adapter.geometry, prefix.token_counts)
    assert kv_cache_bytes(cache) == estimate == 2 * 2 * 2 * 16 * 4 * prefix.num_tokens


class ListLayer(DynamicLayer):
    """A custom layer keeping its tensors in a list and a tuple, plus non-tensor attributes."""

    def __init__(self):
        super().__init__()
        self.parts = [torch.zeros(3, dtype=torch.float32), torch.zeros(5, dtype=torch.float16)]
        self.pair = (torch.zeros(2, 2, dtype=torch.int64), "not a tensor")
        self.note = "metadata"


def test_kv_bytes_count_tensors_in_lists_and_tuples():
    cache = Cache(layers=[ListLayer(), ListLayer()])
    assert kv_cache_bytes(cache) == 2 * (3 * 4 + 5 * 2 + 4 * 8)
    assert kv_cache_bytes(None) == 0


def test_memory_plan_uses_the_real_prefix_and_the_method_estimate(qwen):
    model, _, adapter = qwen
    method = get_method("baseline")
    plan = plan_memory(model, adapter, method, num_frames=8, frame_height=64, frame_width=64, chunk_size=32,
                       suffix_tokens=100, max_new_tokens=5)
    prefix, cache = prefilled(model, adapter, np.zeros((8, 64, 64, 3), dtype=np.uint8), method)
    assert plan.prefix_tokens == prefix.num_tokens and plan.video_tokens == prefix.num_video_tokens
    per_token = kv_cache_bytes(cache) // prefix.num_tokens
    # One prefix, no copy of it: the baseline decodes the 4 tries together, each with its own suffix.
    assert plan.kv_bytes == per_token * (prefix.num_tokens + 4 * (100 + 5))  # the 4 tries decode together
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert plan.weights_bytes == weights
    assert plan.activation_bytes > 0
    assert plan.vision_bytes > 0 and plan.attention_kernel == "math"  # CPU
    assert plan.total_bytes == plan.weights_bytes + max(plan.vision_bytes, plan.kv_bytes + plan.activation_bytes)
    assert plan.fits  # a tiny model fits in this machine's RAM
    assert plan.to_json()["total_bytes"] == plan.total_bytes


def test_planner_warns_when_a_run_will_not_fit():
    too_big = MemoryPlan(weights_bytes=3 * 2**30, kv_bytes=2**30, activation_bytes=0, prefix_tokens=10,
                         video_tokens=5, available_bytes=2**30)
    with pytest.warns(UserWarning, match="will probably not fit"):
        assert warn_if_too_big(too_big) is False
    fits = MemoryPlan(1, 1, 1, 1, 0, available_bytes=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_too_big(fits) is True


# In a fresh process: in a long test session the allocator may hand back memory that is already
# resident (freed by earlier tests), and then a new block does not raise the RSS at all.
PEAK_PROBE = """
import torch
from duokit.metrics import PeakMemory
memory = PeakMemory("cpu")
with memory.measure():
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
print(memory.exact, memory.growth_bytes, memory.peak_bytes)
"""


def test_peak_memory_sees_a_cpu_allocation():
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    exact, growth, peak = result.stdout.split()
    if sys.platform == "linux":  # VmHWM reset through /proc/self/clear_refs
        assert exact == "True" and int(growth) >= 60 * 2**20
    assert int(peak) > 0


def test_stopwatch_accumulates():
    watch = Stopwatch("cpu")
    for _ in range(2):
        with watch:
            time.sleep(0.01)
    assert 0.02 <= watch.seconds < 10  # the bound above only catches a unit slip: a busy CPU stretches sleeps


def test_summarize_cost_aggregates_every_numeric_key():
    from duokit.eval_command import summarize_cost

    records = [
        {"sample_id": "a", "cost": {"kv_bytes": 10, "new_method_cost": 1.0, "peak_memory_exact": True,
                                    "tokens_per_layer": [3, 3], "needles_missed": 0}},
        {"sample_id": "a", "cost": {"kv_bytes": 10, "new_method_cost": 1.0, "peak_memory_exact": True,
                                    "tokens_per_layer": [3, 3], "needles_missed": 0}},
        {"sample_id": "b", "cost": {"kv_bytes": 30, "peak_memory_exact": False, "needles_missed": 1}},
        {"sample_id": "c", "error": "VideoError: gone"},
    ]
    summary = summarize_cost(records)
    assert summary["n_samples"] == 2 and summary["n_errors"] == 1
    assert (summary["kv_bytes"], summary["kv_bytes_max"]) == (20, 30)
    # A key only some samples have (a method's own cost) is averaged over those samples.
    assert (summary["new_method_cost"], summary["new_method_cost_max"]) == (1.0, 1.0)
    assert summary["peak_memory_exact"] is False
    assert summary["needle_coverage"] == 0.5
    assert "tokens_per_layer" not in summary
    assert summarize_cost([]) == {"n_samples": 0, "n_errors": 0}
