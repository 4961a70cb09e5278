"""LLaVolta (`llavolta`): pooling layout, identity at s = 1, an independent layer-by-layer reference for
s > 1, chunked prefill, every tiny VLM family, planned = real KV bytes, `duokit eval`.

The reference below shares nothing with duokit.methods.llavolta but the model's own modules: it runs
the whole sequence (prefix, suffix, answer so far) from scratch at every step, calling the decoder
layers one by one without a cache, and pools the hidden states and positions at layer K by hand.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_models import tiny
from test_engine import FPS, PROMPTS, eval_args, frames, write_dataset

from duokit.cli import main
from duokit.engine import LM, SampleInput, answer_tries
from duokit.io import iter_jsonl
from duokit.methods import get_method
from duokit.methods.llavolta import method as llavolta_method
from duokit.methods.llavolta.pooling import aligned_bounds, pool_assignment, pool_positions, pooled_length
from duokit.methods.preallocated import PreallocatedCache
from duokit.metrics import kv_cache_bytes, plan_memory
from duokit.models.base import TokenCounts

VLMS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
NEW_TOKENS = 5


def video_groups(frame_of: torch.Tensor) -> list[int]:
    """Token counts of the temporal groups `frame_of` numbers, in order."""
    grouped = frame_of[frame_of >= 0]
    return torch.unique_consecutive(grouped, return_counts=True)[1].tolist()


def grid_groups(grids) -> list[int]:
    """The same counts from the video grids (t groups of h*w tokens per grid), what the estimates see."""
    return [h * w for t, h, w in grids for _ in range(t)]


# ---------------------------------------------------------------------------------------------
# The pooling layout.

def test_assignment_pools_within_groups_and_keeps_a_short_remainder():
    #                        text  group 0 (5 tokens)  group 1 (5)      text  group 2 (3)
    frame_of = torch.tensor([-1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, 2, 2, 2])
    assert pool_assignment(frame_of, 2).tolist() == [0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 9, 9, 10]
    assert pool_assignment(frame_of, 4).tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5, 6, 7, 7, 7]
    assert pool_assignment(frame_of, 1).tolist() == list(range(16))
    assert pooled_length(16, [5, 5, 3], 2) == 11 and pooled_length(16, [5, 5, 3], 4) == 8
    with pytest.raises(ValueError, match="stride must be >= 1"):
        pool_assignment(frame_of, 0)


def test_positions_pool_component_wise():
    assignment = torch.tensor([0, 1, 1, 1, 2])
    positions = torch.tensor([[[0, 1, 1, 1, 9]], [[0, 1, 2, 3, 9]], [[0, 4, 4, 6, 9]]])
    mean = pool_positions(positions, assignment, "mean")
    assert mean.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([[[0, 1, 9]], [[0, 2, 9]], [[0, 14 / 3, 9]]], dtype=torch.float32))
    floor = pool_positions(positions, assignment, "floor")
    assert floor.dtype == torch.long and floor.tolist() == [[[0, 1, 9]], [[0, 2, 9]], [[0, 4, 9]]]
    with pytest.raises(ValueError, match="positions must be one of"):
        pool_positions(positions, assignment, "round")


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 100])
def test_chunk_bounds_never_split_a_pooled_token(chunk_size):
    frame_of = torch.tensor([-1] * 3 + [0] * 7 + [1] * 7 + [-1] * 2)
    assignment = pool_assignment(frame_of, 3)
    bounds = aligned_bounds(assignment, chunk_size)
    assert bounds[-1] == len(frame_of) and bounds == sorted(set(bounds))
    starts = [0, *bounds[:-1]]
    assert all(assignment[end - 1] != assignment[end] for end in bounds[:-1])
    # A chunk is longer than chunk_size only when one pooled token (3 tokens) does not fit in it.
    assert all(end - start <= max(chunk_size, 3) for start, end in zip(starts, bounds))


def test_frame_of_follows_each_familys_layout():
    # 8 frames of 96x128 px: Qwen2.5-VL 4 groups of a 3x5 merged grid (patch 14), Qwen3-VL 3x4 (patch 16);
    # LLaVA-OneVision 2x2 per frame.
    for family, per_group in (("qwen2_5_vl", 15), ("qwen3_vl", 12), ("llava_onevision", 4)):
        _, _, adapter = tiny(family)
        prefix = adapter.embed_prefix(adapter.build_prefix(frames(), FPS))
        video = prefix.frame_of[prefix.video_mask]
        groups = 8 if family == "llava_onevision" else 4  # a frame each / 2 frames each
        assert video_groups(prefix.frame_of) == grid_groups(prefix.video_grids) == [per_group] * groups
        assert bool((prefix.frame_of[~prefix.video_mask] == -1).all())
        if family == "llava_onevision":  # the newline after the frames belongs to none
            assert video[-1] == -1 and video[:-1].tolist() == sorted(video[:-1].tolist())


# ---------------------------------------------------------------------------------------------
# Against the baseline and an independent reference.

def method_logits(model, adapter, method, prompt, chunk_size):
    """The engine's path (prepare_prefix, method.prefill, greedy decode) with the logits of every step."""
    lm, sample = LM(model, adapter), SampleInput(frames(), FPS)
    with method.apply(model, adapter), torch.no_grad():
        prefix = method.prepare_prefix(lm.embed(sample), sample, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), chunk_size)
        ids, position, logits = adapter.suffix_ids(prompt, True), prefix.next_position, []
        for _ in range(NEW_TOKENS):
            hidden = adapter.language_model(input_ids=ids, position_ids=adapter.positions(position, ids.shape[1]),
                                            past_key_values=cache, use_cache=True).last_hidden_state
            logits.append(adapter.lm_head(hidden[:, -1]))
            position += ids.shape[1]
            ids = logits[-1].argmax(-1, keepdim=True)
    return torch.cat(logits)


@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("chunk_size", [16, 1000])
def test_stride_one_reproduces_the_baseline_exactly(family, layer, chunk_size):
    model, _, adapter = tiny(family)
    baseline = method_logits(model, adapter, get_method("baseline"), PROMPTS[0], chunk_size)
    identity = method_logits(model, adapter, get_method("llavolta", layer=layer, stride=1), PROMPTS[0], chunk_size)
    assert torch.equal(identity, baseline)


def hand_groups(frame_of: list[int], stride: int) -> list[list[int]]:
    """Token indices of each pooled token: runs of one temporal group cut every `stride` tokens."""
    groups: list[list[int]] = []
    for index, group in enumerate(frame_of):
        previous = frame_of[index - 1] if index else None
        if group < 0 or group != previous or len(groups[-1]) == stride:
            groups.append([index])
        else:
            groups[-1].append(index)
    return groups


def reference_tokens(model, adapter, prompt, layer, stride, positions="mean"):
    """Greedy answer with the pooling done by hand: no cache, no hooks, every step from scratch."""
    lm = adapter.language_model
    prefix = adapter.embed_prefix(adapter.build_prefix(frames(), FPS))
    groups = hand_groups(prefix.frame_of.tolist(), stride)
    deepstack = prefix.layer_inputs.get("deepstack_visual_embeds", [])
    video = prefix.video_mask.nonzero()[:, 0].tolist()

    def pool_hidden(hidden):
        return torch.stack([hidden[0, g].mean(0) for g in groups])[None]

    def pool_positions_by_hand(position_ids):
        pooled = torch.stack([position_ids[..., g].float().mean(-1) for g in groups], dim=-1)
        return pooled.floor() if positions == "floor" else pooled

    suffix, tokens = adapter.suffix_ids(prompt, True)[0].tolist(), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            text = torch.tensor([suffix + tokens])
            hidden = torch.cat([prefix.inputs_embeds, model.get_input_embeddings()(text)], dim=1)
            position_ids = torch.cat([prefix.position_ids.float(),
                                      adapter.positions(prefix.next_position, text.shape[1]).float()], dim=-1)
            rows, video_at = deepstack, video
            n_prefix = prefix.num_tokens
            for index, decoder in enumerate(adapter.decoder_layers):
                if index == layer:
                    pooled = pool_hidden(hidden[:, :n_prefix])
                    hidden = torch.cat([pooled, hidden[:, n_prefix:]], dim=1)
                    position_ids = torch.cat([pool_positions_by_hand(position_ids[..., :n_prefix]),
                                              position_ids[..., n_prefix:]], dim=-1)
                    # A pooled token's deepstack row (K = 0 only) is the mean of its members' rows.
                    members = [[video.index(i) for i in g] for g in groups if g[0] in video]
                    rows = [torch.stack([r[m].mean(0) for m in members]) for r in deepstack]
                    video_at = [k for k, g in enumerate(groups) if g[0] in video]
                    n_prefix = len(groups)
                hidden = decoder(hidden, attention_mask=None, position_embeddings=lm.rotary_emb(hidden, position_ids),
                                 past_key_values=None, use_cache=False)
                if index < len(deepstack):
                    hidden = hidden.clone()
                    hidden[0, video_at] += rows[index]
            token = int(adapter.lm_head(lm.norm(hidden[:, -1])).argmax(-1))
            tokens.append(token)
            if token in adapter.eos_token_ids:
                break
    return tokens


@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("layer,stride", [(0, 2), (0, 5), (1, 3), (1, 16)])
def test_tokens_equal_the_hand_pooled_reference(family, layer, stride):
    model, _, adapter = tiny(family)
    method = get_method("llavolta", layer=layer, stride=stride)
    with method.apply(model, adapter):
        # Chunks of 7 tokens would split pooled tokens; the method moves the bounds.
        result = answer_tries(LM(model, adapter), method, SampleInput(frames(), FPS), PROMPTS[:2], chunk_size=7)
    observed = [answer.tokens for answer in result.answers]
    assert observed == [reference_tokens(model, adapter, prompt, layer, stride) for prompt in PROMPTS[:2]]
    # The pooling changed what the model computed (the test would not notice a no-op otherwise).
    baseline = method_logits(model, adapter, get_method("baseline"), PROMPTS[0], 1000)
    assert not torch.allclose(method_logits(model, adapter, method, PROMPTS[0], 1000), baseline, atol=1e-3)


def test_floor_positions_equal_the_reference():
    model, _, adapter = tiny("qwen2_5_vl")
    method = get_method("llavolta", layer=1, stride=3, positions="floor")
    with method.apply(model, adapter):
        result = answer_tries(LM(model, adapter), method, SampleInput(frames(), FPS), PROMPTS[:2])
    assert [a.tokens for a in result.answers] == [reference_tokens(model, adapter, p, 1, 3, "floor")
                                                  for p in PROMPTS[:2]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("layer", [0, 1])
def test_chunk_sizes_that_split_groups_give_the_one_chunk_answer(family, layer, monkeypatch):
    model, _, adapter = tiny(family)
    method = get_method("llavolta", layer=layer, stride=4)
    prompt = PROMPTS[1]
    whole = method_logits(model, adapter, method, prompt, 10**6)
    for chunk_size in (1, 3, 5, 6, 18):
        chunked = method_logits(model, adapter, method, prompt, chunk_size)
        assert torch.equal(chunked.argmax(-1), whole.argmax(-1))
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=5e-5)
    if layer > 0:  # plain bounds of 6 tokens split pooled tokens, and the answer changes
        monkeypatch.setattr(llavolta_method, "aligned_bounds",
                            lambda assignment, size: [*range(size, len(assignment), size), len(assignment)])
        assert not torch.allclose(method_logits(model, adapter, method, prompt, 6), whole, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# KV bytes, deepcopy, settings.

@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("layer,stride", [(0, 1), (0, 3), (1, 2), (1, 16)])
def test_planned_kv_bytes_equal_what_the_cache_holds(family, layer, stride):
    model, _, adapter = tiny(family)
    method = get_method("llavolta", layer=layer, stride=stride)
    lm, sample, geometry = LM(model, adapter), SampleInput(frames(), FPS), adapter.geometry
    assert geometry.dtype_bytes == 4
    lm.decode_reserve = 3  # the engine reserves room for the longest try
    with method.apply(model, adapter), torch.no_grad():
        raw = lm.embed(sample)
        counts = raw.token_counts  # the estimate sees the grids, as the memory planner does (no vision tower)
        groups = grid_groups(counts.video_grids)
        assert groups == video_groups(raw.frame_of)
        prefix = method.prepare_prefix(raw, sample, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), chunk_size=9)
        prefix_bytes = kv_cache_bytes(cache)
        assert prefix_bytes == method.estimate_kv_bytes(geometry, counts)
        if isinstance(cache, PreallocatedCache):  # pooled layers are allocated for the pooled tokens only
            assert cache.reserved_bytes() == prefix_bytes + 2 * 2 * 2 * 16 * 4 * lm.decode_reserve
        twin = copy.deepcopy(cache)
        suffix = adapter.suffix_ids(PROMPTS[0], True)
        step = {"input_ids": suffix, "position_ids": adapter.positions(prefix.next_position, suffix.shape[1]),
                "use_cache": True}
        first = adapter.language_model(past_key_values=cache, **step).last_hidden_state
        second = adapter.language_model(past_key_values=twin, **step).last_hidden_state
        assert torch.equal(first, second)
        with_suffix = TokenCounts(counts.text + suffix.shape[1], counts.video, counts.video_grids)
        assert kv_cache_bytes(twin) == method.estimate_kv_bytes(geometry, with_suffix)
    pooled = pooled_length(raw.num_tokens, groups, stride)
    assert prefix_bytes == 2 * 2 * 16 * 4 * (layer * raw.num_tokens + (2 - layer) * pooled)
    assert (pooled < raw.num_tokens) == (stride > 1)
    if (layer, stride) == (1, 2):  # the memory planner plans the pooled KV
        plan = plan_memory(model, adapter, method, 8, 96, 128, chunk_size=9)
        text = plan.prefix_tokens - plan.video_tokens
        planned = TokenCounts(text + 256 + 5, plan.video_tokens, counts.video_grids)  # one cache, restored per try
        assert plan.kv_bytes == method.estimate_kv_bytes(geometry, planned)


def test_presets_and_bad_settings():
    model, _, adapter = tiny("qwen2_5_vl")
    assert get_method("llavolta").pool_layer(36) == 2 and get_method("llavolta").pool_stride == 8
    light = get_method("llavolta", preset="light")
    assert light.pool_layer(36) == 18 and light.pool_stride == 8
    assert get_method("llavolta", preset="light", stride=2).pool_stride == 2
    assert get_method("llavolta", stride=4).settings() == {"name": "llavolta", "preset": "heavy", "layer": None,
                                                           "stride": 4, "positions": "mean"}
    for settings, message in (({"preset": "medium"}, "preset must be one of heavy, light"),
                              ({"positions": "round"}, "positions must be one of mean, floor"),
                              ({"stride": 0}, "stride must be an integer >= 1"),
                              ({"layer": -1}, "layer must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            get_method("llavolta", **settings)
    with pytest.raises(ValueError, match="not below the model's 2 layers"), \
            get_method("llavolta").apply(model, adapter):  # heavy: K = 2 on a 2-layer model
        pass


def test_layer_inside_the_deepstack_layers_is_refused(monkeypatch):
    model, _, adapter = tiny("qwen3_vl")
    monkeypatch.setattr(model.config.vision_config, "deepstack_visual_indexes", [0, 1])
    with pytest.raises(ValueError, match="among the 2 deepstack layers"), \
            get_method("llavolta", layer=1, stride=2).apply(model, adapter):
        pass
    with get_method("llavolta", layer=0, stride=2).apply(model, adapter):  # K = 0 pools the rows too
        pass


def test_apply_removes_its_hooks():
    model, _, adapter = tiny("qwen2_5_vl")
    before = [dict(layer._forward_pre_hooks) for layer in adapter.decoder_layers]
    with get_method("llavolta", layer=1, stride=2).apply(model, adapter):
        assert all(len(layer._forward_pre_hooks) == len(b) + 1 for layer, b in zip(adapter.decoder_layers, before))
    assert [dict(layer._forward_pre_hooks) for layer in adapter.decoder_layers] == before


def test_eval_cli_runs_llavolta(tmp_path):
    annotations, videos = write_dataset(tmp_path)
    run = tmp_path / "run"
    args = eval_args(annotations, videos, run)
    args[args.index("baseline")] = "llavolta"
    assert main([*args, "--set", "layer=1", "--set", "stride=4"]) == 0
    decoded = [p for p in iter_jsonl(run / "predictions.jsonl") if p["error"] is None]
    assert len(decoded) == 8 and all(len(p["output_tokens"]) == 5 for p in decoded)
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == {"name": "llavolta", "preset": "heavy", "layer": 1, "stride": 4, "positions": "mean"}
    cost = decoded[0]["cost"]
    # 4 frames of 96x128 px: 2 temporal groups of 15 tokens -> 4 pooled tokens each; layer 0 keeps all.
    pooled = cost["prefix_tokens"] - 30 + 8
    assert cost["kv_bytes"] == 2 * 2 * 16 * 4 * (cost["prefix_tokens"] + pooled)
    assert main([*args, "--set", "stride=0"]) == 1
