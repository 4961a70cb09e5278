"""`llamb`: SceneTilling against hand-computed depth scores and boundaries; the recurrent memory against a
dense prefill and an independent segment-by-segment reference (eager attention weights, a plain
DynamicCache); the planned peak KV against the measured one; failure paths. The identity (memory
keeps everything -> the baseline, bit for bit) is in tests/test_method_conformance.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _tiny_models import tiny
from transformers import DynamicCache

from duokit.engine import LM, SampleInput, answer_tries
from duokit.methods import get_method
from duokit.methods.llamb.memory import MemoryLayer, attention_mass
from duokit.methods.llamb.segment import (
    deepest,
    depth_scores,
    sampled_frames,
    scene_boundaries,
    uniform_boundaries,
)
from duokit.models.base import TokenCounts

# Similarities of 6 gaps (7 frames): gap 1 climbs to 0.9 left and 0.8 (over the 0.8 plateau) right,
# gap 4 to 0.8 left (plateau again) and 0.7 right; every other gap sits on a local maximum.
SIMILARITY = [0.9, 0.5, 0.8, 0.8, 0.2, 0.7]
DEPTH = [0.0, 0.7, 0.0, 0.0, 1.1, 0.0]


def descriptors_with(similarity: list[float]) -> torch.Tensor:
    """Unit vectors in the plane whose neighbours have exactly these cosine similarities."""
    angles = np.concatenate([[0.0], np.cumsum(np.arccos(similarity))])
    return torch.tensor(np.stack([np.cos(angles), np.sin(angles)], axis=1), dtype=torch.float64)


def test_depth_scores_climb_to_the_nearest_peak_on_each_side():
    assert depth_scores(torch.tensor(SIMILARITY, dtype=torch.float64)).tolist() == pytest.approx(DEPTH)
    # A plateau is climbed over (>=), a drop stops the climb; the last gap's right peak is itself.
    assert depth_scores(torch.tensor([0.3, 0.6, 0.6, 0.2])).tolist() == pytest.approx([0.3, 0.0, 0.0, 0.4])


def test_scene_boundaries_top_k_and_threshold():
    descriptors = descriptors_with(SIMILARITY)
    assert scene_boundaries(descriptors, segments=1) == [4, 6]  # the deepest gap, then T-1 closes
    assert scene_boundaries(descriptors, segments=2) == [1, 4, 6]
    # depth mean 0.3, unbiased std 0.4817: alpha 0.5 -> 0.54, alpha 1 -> 0.78, alpha 2 -> 1.26
    assert scene_boundaries(descriptors, threshold=0.5) == [1, 4, 6]
    assert scene_boundaries(descriptors, threshold=1.0) == [4, 6]
    assert scene_boundaries(descriptors, threshold=2.0) == [6]


def test_equal_depths_prefer_the_earlier_gap():
    depth = depth_scores(torch.tensor([0.5, 0.9, 0.5, 0.9, 0.5]))
    assert depth.tolist() == pytest.approx([0.4, 0.0, 0.8, 0.0, 0.4])
    assert deepest(depth, 2) == [0, 2]
    assert deepest(depth, 3) == [0, 2, 4]


def test_threshold_mode_keeps_at_most_15_boundaries():
    # 40 frames a, a, b, b, a, a, ...: the 19 odd gaps are valleys of exactly equal depth, all above the mean.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    descriptors = torch.stack([a if (frame // 2) % 2 == 0 else b for frame in range(40)])
    assert scene_boundaries(descriptors, threshold=0.0) == [*range(1, 31, 2), 39]


def test_frame_counts_the_original_refuses():
    """The original asserts T % 8 == 0, so it never sees fewer than k + 1 = 4 frames; here k is capped."""
    rng = torch.Generator().manual_seed(0)
    assert scene_boundaries(torch.randn(1, 4, generator=rng)) == [0]
    assert scene_boundaries(torch.randn(2, 4, generator=rng)) == [0, 1]
    assert scene_boundaries(torch.randn(3, 4, generator=rng)) == [0, 1, 2]
    assert scene_boundaries(torch.randn(2, 4, generator=rng), threshold=0.5) == [1]  # one gap: std is nan
    eight = scene_boundaries(torch.randn(8, 4, generator=rng))  # the smallest T the original accepts
    assert len(eight) == 4 and eight[-1] == 7 and eight == sorted(set(eight))
    nine = scene_boundaries(torch.randn(9, 4, generator=rng))  # T % 8 != 0: accepted here
    assert len(nine) == 4 and nine[-1] == 8
    with pytest.raises(ValueError, match="at least one frame"):
        scene_boundaries(torch.zeros(0, 4))


def test_uniform_boundaries_and_frame_sampling():
    assert uniform_boundaries(16, 3) == [3, 7, 11, 15]
    assert uniform_boundaries(10, 3) == [1, 4, 6, 9]
    assert uniform_boundaries(2, 3) == [0, 1]
    assert uniform_boundaries(1, 3) == [0]
    # The original's torch.linspace(start, end, min(8, length), dtype=torch.int).
    assert sampled_frames(0, 19, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert sampled_frames(4, 9, 8) == [4, 5, 6, 7, 8, 9]
    assert sampled_frames(4, 9, None) == [4, 5, 6, 7, 8, 9]


def test_attention_mass_equals_the_softmax_of_the_last_rows():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    mass = attention_mass(query, keys, 0.5)
    expected = torch.zeros(10)
    for head in range(4):
        for row in range(3):
            visible = 10 - 3 + row + 1
            scores = keys[0, head // 2, :visible] @ query[0, head, row] * 0.5
            expected[:visible] += scores.softmax(-1)
    assert torch.allclose(mass, expected, atol=1e-6)
    assert mass.sum().item() == pytest.approx(12.0)


# --- the memory on a tiny Qwen2.5-VL -------------------------------------------------------------

def video_sample(frames: int = 16) -> SampleInput:
    return SampleInput(np.random.default_rng(0).integers(0, 256, (frames, 96, 128, 3), dtype=np.uint8), 0.5)


def prefilled(method, chunk: int = 4096):
    model, _, adapter = tiny("qwen2_5_vl")
    lm, sample = LM(model, adapter), video_sample()
    with method.apply(model, adapter):
        prefix = method.prepare_prefix(lm.embed(sample), sample, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), chunk)
    return lm, prefix, cache


def dense(lm, prefix):
    method = get_method("baseline")
    with method.apply(lm.model, lm.adapter):
        return lm.prefill(prefix, method.new_cache(lm, prefix), 4096)


def test_tokens_nothing_was_evicted_before_equal_the_dense_prefill():
    method = get_method("llamb", segmentation="uniform", memory_tokens=6)
    lm, prefix, cache = prefilled(method)
    plan = method.plan(prefix)
    assert plan.sizes == [30, 30, 30, 30]  # 8 temporal groups of 15 tokens, 3 boundaries
    first_eviction = plan.segments[0][-1][1]
    reference = dense(lm, prefix)
    expected = plan.system + 6 + 30 + (plan.length - plan.video_end)
    changed_later = False
    for index, (layer, ids) in enumerate(zip(cache.layers, method.kept_tokens, strict=True)):
        assert layer.keys.shape[-2] == len(ids) == expected
        assert ids.tolist()[:plan.system] == list(range(plan.system))
        assert ids.tolist()[-31:] == list(range(plan.segments[-1][0][0], plan.length))  # last segment + tail whole
        dense_keys, dense_values = reference.layers[index].keys[..., ids, :], reference.layers[index].values[..., ids, :]
        early = ids < first_eviction
        assert torch.allclose(layer.keys[..., early, :], dense_keys[..., early, :], atol=1e-5)
        assert torch.allclose(layer.values[..., early, :], dense_values[..., early, :], atol=1e-5)
        if index == 0:  # layer 0's KV depends on the token and its position only: kept positions are the original
            assert torch.allclose(layer.keys, dense_keys, atol=1e-5)
        else:
            changed_later |= not torch.allclose(layer.keys[..., ~early, :], dense_keys[..., ~early, :], atol=1e-3)
    assert changed_later  # later tokens saw an evicted context
    assert cache.get_seq_length() == plan.length


def reference_prefill(lm, prefix, plan, memory: int, select: str):
    """Segment by segment through the model's own eager attention and a plain DynamicCache; the memory
    chosen from the attention weights the model returns (attention) or averaged by hand (pool)."""
    model, adapter = lm.model, lm.adapter
    previous = adapter.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        cache, system = DynamicCache(config=adapter.text_config), plan.system
        ends = [runs[-1][1] for runs in plan.segments[:-1]] + [plan.length]
        kept = [[] for _ in range(adapter.num_layers)]
        for start, end in zip([0, *ends], ends):
            with torch.no_grad():
                out = adapter.language_model(inputs_embeds=prefix.inputs_embeds[:, start:end],
                                             position_ids=prefix.position_ids[..., start:end], past_key_values=cache,
                                             use_cache=True, output_attentions=True)
            kept = [ids + list(range(start, end)) for ids in kept]
            if end == plan.length:
                break
            for index, layer in enumerate(cache.layers):
                tail_keys, tail_values = layer.keys[..., system:, :], layer.values[..., system:, :]
                if select == "attention":
                    mass = out.attentions[index][0, :, -8:, system:].sum(dim=(0, 1))
                    chosen = sorted(sorted(range(len(mass)), key=lambda i: -mass[i].item())[:memory])
                    tail_keys, tail_values = tail_keys[..., chosen, :], tail_values[..., chosen, :]
                    kept[index] = kept[index][:system] + [kept[index][system + i] for i in chosen]
                else:
                    n = tail_keys.shape[-2]
                    members = [[i for i in range(n) if i * memory // n == b] for b in range(memory)]
                    tail_keys = torch.stack([tail_keys[..., m, :].mean(-2) for m in members], dim=-2)
                    tail_values = torch.stack([tail_values[..., m, :].mean(-2) for m in members], dim=-2)
                    kept[index] = kept[index][:system] + [-1] * memory
                layer.keys = torch.cat([layer.keys[..., :system, :], tail_keys], dim=-2)
                layer.values = torch.cat([layer.values[..., :system, :], tail_values], dim=-2)
        return cache, kept
    finally:
        model.set_attn_implementation({"text_config": previous})


@pytest.mark.parametrize("settings", [{"segmentation": "uniform", "memory_tokens": 6},
                                      {"segmentation": "scene", "memory_tokens": 10},
                                      {"segmentation": "scene", "memory_tokens": 7, "memory_select": "pool"},
                                      {"segmentation": "uniform", "memory_tokens": 0}])
def test_memory_equals_a_hand_run_segment_by_segment_reference(settings):
    method = get_method("llamb", **settings)
    lm, prefix, cache = prefilled(method)
    plan = method.plan(prefix)
    reference, kept = reference_prefill(lm, prefix, plan, settings["memory_tokens"],
                                        settings.get("memory_select", "attention"))
    for index, (layer, want) in enumerate(zip(cache.layers, reference.layers, strict=True)):
        assert method.kept_tokens[index].tolist() == kept[index]
        assert torch.allclose(layer.keys, want.keys, atol=1e-5)
        assert torch.allclose(layer.values, want.values, atol=1e-5)


@pytest.mark.parametrize("settings", [{}, {"memory_tokens": 4}, {"segmentation": "uniform", "memory_tokens": 20},
                                      {"threshold": 0.5, "memory_tokens": 8}, {"memory_tokens": 8, "memory_select": "pool"},
                                      {"memory_tokens": 5, "frames_per_segment": 1}, {"memory_tokens": 0, "segments": 7}])
def test_measured_peak_kv_equals_the_formula(settings):
    model, _, adapter = tiny("qwen2_5_vl")
    lm, method = LM(model, adapter), get_method("llamb", **settings)
    with method.apply(model, adapter):
        result = answer_tries(lm, method, video_sample(), ["Which colour is the card?", "Is there a red card?"],
                              chunk_size=16)
    cost = result.cost
    assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"] > 0
    # The planner's bound (before the segments are known) is never below the sample's peak (tries < 100 tokens).
    bound = TokenCounts(cost["prefix_tokens"] - cost["video_tokens"] + 100, cost["video_tokens"], ((8, 3, 5),))
    assert method.estimate_kv_bytes(lm.geometry, bound) >= cost["kv_bytes_peak"]


def test_peak_formula_by_hand():
    method = get_method("llamb", segmentation="uniform", memory_tokens=10)
    _lm, prefix, _ = prefilled(method)
    plan = method.plan(prefix)  # system 45, four segments of 30, 1 token after the video
    # Peaks: 45+0+30, 45+10+30, 45+10+30, final 45+10+30+1+after.
    assert method.peak_tokens(plan, 0) == 86
    assert method.peak_tokens(plan, 7) == 93
    capped = get_method("llamb", segmentation="uniform", memory_tokens=10, frames_per_segment=1)
    assert capped.plan(prefix).sizes == [15, 15, 15, 15]
    assert capped.peak_tokens(capped.plan(prefix), 0) == 45 + 10 + 15 + 1
    assert get_method("llamb", memory_tokens=1 << 20).peak_tokens(plan, 3) == plan.length + 3


def test_budget_settings():
    from duokit.models.base import Geometry

    geometry = Geometry(2, 4, 2, 16, 64, 128, 4)
    tokens = TokenCounts(100, 64 * 256, ((64, 16, 16),))
    assert get_method("llamb").budget_settings(0.5, geometry, tokens) == {"segments": 3, "memory_tokens": 4096}
    assert get_method("llamb").budget_settings(0.125, geometry, tokens) == {"segments": 15, "memory_tokens": 1024}
    assert get_method("llamb").budget_settings(1.0, geometry, tokens)["segments"] == 1
    with pytest.raises(ValueError, match="budget must be in"):
        get_method("llamb").budget_settings(0, geometry, tokens)


def test_cache_crop_and_deepcopy_keep_positions_consistent():
    method = get_method("llamb", memory_tokens=4)
    lm, _prefix, cache = prefilled(method)
    held, seen = cache.layers[0].keys.shape[-2], cache.get_seq_length()
    copied = copy.deepcopy(cache)
    keys = torch.zeros(1, lm.geometry.num_kv_heads, 3, lm.geometry.head_dim)
    copied.update(keys, keys, 0)
    assert copied.layers[0].keys.shape[-2] == held + 3 and copied.get_seq_length() == seen + 3
    copied.crop(-3)
    assert copied.layers[0].keys.shape[-2] == held and copied.get_seq_length() == seen
    with pytest.raises(ValueError, match="negative"):
        copied.layers[0].crop(2)
    with pytest.raises(ValueError, match="cannot crop"):
        copied.layers[0].crop(-(held + 1))


def test_failure_paths():
    with pytest.raises(ValueError, match="segmentation must be one of scene, uniform"):
        get_method("llamb", segmentation="shots")
    with pytest.raises(ValueError, match="needs segmentation=scene"):
        get_method("llamb", segmentation="uniform", threshold="0.5")
    with pytest.raises(ValueError, match="memory_tokens must be an integer >= 0"):
        get_method("llamb", memory_tokens="-1")
    with pytest.raises(ValueError, match="memory_select must be one of attention, pool"):
        get_method("llamb", memory_select="random")
    with pytest.raises(ValueError, match="frames_per_segment must be an integer >= 1"):
        get_method("llamb", frames_per_segment="0")
    with pytest.raises(ValueError, match="not a valid float | None"):
        get_method("llamb", threshold="high")
    layer = MemoryLayer()
    with pytest.raises(ValueError, match="batch size 1"):
        layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    model, _, _adapter = tiny("qwen2_5_vl")
    with pytest.raises(RuntimeError, match="must run inside"):
        get_method("llamb").check_applied(model)
