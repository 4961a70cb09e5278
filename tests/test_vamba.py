"""Vamba proxy (`vamba`): chunk layout, identity, an independent dense reference with the block-causal
mask built by hand, the MLP skip, the O(N·c) key reads, failure paths, the FLOP formula and the budget.

The reference shares nothing with duokit.methods.vamba but the model's own modules: every decoding step
runs the whole sequence (prefix, suffix, answer so far) from scratch through the decoder layers one by
one, written out (norm, self-attention, residual, norm, MLP, residual), with transformers' eager
attention and a 4-D additive mask built from the token layout by a rule written independently below.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import tiny
from test_engine import FPS, PROMPTS, eval_args, frames, write_dataset

from duokit.cli import main
from duokit.engine import LM, SampleInput, answer_tries
from duokit.io import iter_jsonl
from duokit.methods import get_method, method_class
from duokit.methods.base import causal_pairs, score_flops
from duokit.methods.vamba import attention as vamba_attention
from duokit.methods.vamba.layout import local_starts, piece_bounds, skipped_pairs
from duokit.models.base import TokenCounts

VLMS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
NEW_TOKENS = 5


def run(model, adapter, method, prompts, chunk_size=16, sample=None):
    with method.apply(model, adapter):
        return answer_tries(LM(model, adapter), method, sample or SampleInput(frames(), FPS), prompts,
                            chunk_size=chunk_size, keep_logits=True)


# ---------------------------------------------------------------------------------------------
# The hand-built mask (independent of layout.py).

def hand_allowed(frame_of: list[int], video: list[bool], length: int, chunk_frames, sinks: int) -> torch.Tensor:
    """(length, length) bool: may query i read key j. Prefix tokens from the layout; tokens past the
    prefix (suffix, answer) are text. A token inside the video span that is not in a group belongs to the
    chunk of the next grouped token (the last chunk if none follows)."""
    grouped = [i for i, g in enumerate(frame_of) if g >= 0]
    chunk = [None] * length
    if grouped and chunk_frames is not None:
        span_end = max(i for i, v in enumerate(video) if v)
        for i in range(grouped[0], span_end + 1):
            following = [j for j in grouped if j >= i]
            chunk[i] = frame_of[following[0] if following else grouped[-1]] // chunk_frames
    first_of = {}
    for i, k in enumerate(chunk):
        if k is not None:
            first_of.setdefault(k, i)
    sink_end = grouped[0] + sinks if grouped else 0
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            allowed[i, j] = chunk[i] is None or j < sink_end or j >= first_of[chunk[i]]
    return allowed


def test_hand_mask_and_layout_agree_on_a_qwen3_like_span():
    # text | group 0 | timestamp text | group 1 | timestamp | group 2 | trailing video token | text
    frame_of = [-1, -1, 0, 0, -1, 1, 1, -1, 2, 2, -1, -1]
    video = [False, False, True, True, False, True, True, False, True, True, True, False]
    local, sink_end = local_starts(torch.tensor(frame_of), torch.tensor(video), 1, 1)
    assert sink_end == 3
    assert local.tolist() == [-1, -1, -1, -1, 4, 4, 4, 7, 7, 7, 7, -1]
    allowed = hand_allowed(frame_of, video, len(frame_of), 1, 1)
    for i, start in enumerate(local.tolist()):
        expected = [j <= i and (start < 0 or j < sink_end or j >= start) for j in range(len(frame_of))]
        assert allowed[i].tolist() == expected
    # Two groups per chunk: groups 0-1 form chunk 0 (global), group 2 and the trailing token chunk 1.
    assert local_starts(torch.tensor(frame_of), torch.tensor(video), 2, 0)[0].tolist() == [-1] * 7 + [7] * 4 + [-1]
    # Sinks reaching into a chunk make it global; no chunks or no video: all global.
    assert local_starts(torch.tensor(frame_of), torch.tensor(video), 1, 4)[0].tolist() == [-1] * 7 + [7] * 4 + [-1]
    assert local_starts(torch.tensor(frame_of), torch.tensor(video), 1, 5)[0].tolist() == [-1] * 12
    assert local_starts(torch.tensor(frame_of), torch.tensor(video), None, 0)[0].tolist() == [-1] * 12
    no_video, no_sinks = local_starts(torch.full((4,), -1), torch.zeros(4, dtype=torch.bool), 1, 0)
    assert no_video.tolist() == [-1] * 4 and no_sinks == 0


def test_piece_bounds_follow_runs_and_chunk_size():
    local = torch.tensor([-1, -1, -1, 4, 4, 4, 4, 4, 9, 9, -1])
    assert piece_bounds(local, 2) == [2, 3, 5, 7, 8, 10, 11]
    assert piece_bounds(local, 100) == [3, 8, 10, 11]
    assert piece_bounds(torch.full((7,), -1), 3) == [3, 6, 7]  # the engine's plain bounds
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        piece_bounds(local, 0)


# ---------------------------------------------------------------------------------------------
# Identity and the dense reference.

@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("settings", [{"chunk_frames": None}, {"chunk_frames": 8}, {"chunk_frames": 1, "sinks": 10**6}])
def test_identity_settings_reproduce_the_baseline_exactly(family, settings):
    model, _, adapter = tiny(family)
    expected = run(model, adapter, get_method("baseline"), PROMPTS[:2], chunk_size=7)
    result = run(model, adapter, get_method("vamba", **settings), PROMPTS[:2], chunk_size=7)
    for got, want in zip(result.answers, expected.answers, strict=True):
        assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert result.cost["kv_bytes_peak"] == expected.cost["kv_bytes_peak"]
    assert result.cost["attention_flops"] == expected.cost["attention_flops"]


def reference(model, adapter, prompt, chunk_frames, sinks, skip_mlp_from=None):
    """(tokens, per-step logits) with the block-causal mask by hand, eager attention, no cache."""
    lm = adapter.language_model
    prefix = adapter.embed_prefix(adapter.build_prefix(frames(), FPS))
    frame_of, video = prefix.frame_of.tolist(), prefix.video_mask.tolist()
    deepstack = prefix.layer_inputs.get("deepstack_visual_embeds", [])
    video_at = prefix.video_mask.nonzero()[:, 0]
    suffix, tokens, logits = adapter.suffix_ids(prompt, True)[0].tolist(), [], []
    previous = adapter.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                text = torch.tensor([suffix + tokens])
                hidden = torch.cat([prefix.inputs_embeds, model.get_input_embeddings()(text)], dim=1)
                length = hidden.shape[1]
                position_ids = torch.cat([prefix.position_ids, adapter.positions(prefix.next_position,
                                                                                 text.shape[1])], dim=-1)
                allowed = hand_allowed(frame_of, video + [False] * text.shape[1], length, chunk_frames, sinks)
                mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
                no_mlp = torch.zeros(length, dtype=torch.bool)
                no_mlp[:prefix.num_tokens] = prefix.video_mask
                rotary = lm.rotary_emb(hidden, position_ids)
                for index, decoder in enumerate(adapter.decoder_layers):
                    attended, _ = decoder.self_attn(hidden_states=decoder.input_layernorm(hidden),
                                                    attention_mask=mask, position_embeddings=rotary)
                    hidden = hidden + attended
                    update = decoder.mlp(decoder.post_attention_layernorm(hidden))
                    if skip_mlp_from is not None and index >= skip_mlp_from:
                        update = update * ~no_mlp[None, :, None]
                    hidden = hidden + update
                    if index < len(deepstack):
                        hidden = hidden.clone()
                        hidden[0, video_at] += deepstack[index]
                step = adapter.lm_head(lm.norm(hidden[:, -1])).float()[0]
                logits.append(step)
                tokens.append(int(step.argmax()))
                if tokens[-1] in adapter.eos_token_ids:
                    break
    finally:
        model.set_attn_implementation({"text_config": previous})
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("family,chunk_frames,sinks,skip_mlp_from", [
    *((family, 1, 0, None) for family in VLMS),
    ("qwen2_5_vl", 2, 3, None), ("qwen2_vl", 1, 5, 0), ("qwen3_vl", 3, 0, 1), ("llava_onevision", 3, 2, 0)])
def test_tokens_and_logits_equal_the_hand_masked_reference(family, chunk_frames, sinks, skip_mlp_from):
    model, _, adapter = tiny(family)
    method = get_method("vamba", chunk_frames=chunk_frames, sinks=sinks, skip_mlp_from=skip_mlp_from)
    result = run(model, adapter, method, PROMPTS[:1], chunk_size=7)
    for answer, prompt in zip(result.answers, PROMPTS[:1], strict=True):
        tokens, logits = reference(model, adapter, prompt, chunk_frames, sinks, skip_mlp_from)
        assert answer.tokens == tokens
        torch.testing.assert_close(answer.logits, logits, rtol=1e-4, atol=1e-4)
    # The chunks changed what the model computed (a no-op would pass the comparison otherwise).
    baseline = run(model, adapter, get_method("baseline"), PROMPTS[:1], chunk_size=7).answers[0].logits
    assert not torch.allclose(result.answers[0].logits, baseline, atol=1e-3)


def test_mlp_skip_changes_the_answer_and_equals_its_reference():
    # Layer 0's MLP of the video tokens feeds layer 1's keys and values; without chunks (c = all) only the
    # skip acts. Skipping from the last layer cannot change anything the text reads (its K/V come first).
    model, _, adapter = tiny("qwen2_5_vl")
    skip = run(model, adapter, get_method("vamba", chunk_frames=None, skip_mlp_from=0), PROMPTS[:1])
    tokens, logits = reference(model, adapter, PROMPTS[0], None, 0, skip_mlp_from=0)
    assert skip.answers[0].tokens == tokens
    torch.testing.assert_close(skip.answers[0].logits, logits, rtol=1e-4, atol=1e-4)
    baseline = run(model, adapter, get_method("baseline"), PROMPTS[:1])
    assert not torch.allclose(skip.answers[0].logits, baseline.answers[0].logits, atol=1e-3)
    last = run(model, adapter, get_method("vamba", chunk_frames=None, skip_mlp_from=1), PROMPTS[:1])
    torch.testing.assert_close(last.answers[0].logits, baseline.answers[0].logits, rtol=1e-5, atol=1e-5)
    assert skip.cost["mlp_flops"] < baseline.cost["mlp_flops"] == run(
        model, adapter, get_method("vamba", chunk_frames=None), PROMPTS[:1]).cost["mlp_flops"]


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_any_chunk_size_gives_the_same_answer(chunk_size):
    model, _, adapter = tiny("qwen2_5_vl")
    method = get_method("vamba", chunk_frames=1, sinks=2, skip_mlp_from=0)
    whole = run(model, adapter, method, PROMPTS[:1], chunk_size=10**6).answers[0]
    chunked = run(model, adapter, method, PROMPTS[:1], chunk_size=chunk_size).answers[0]
    assert chunked.tokens == whole.tokens
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=1e-4)


def test_video_chunks_read_only_the_sinks_and_their_chunk(monkeypatch):
    # The work is O(N·c): a chunk's call attends over sink_end + its chunk's keys, never the whole cache.
    model, _, adapter = tiny("qwen2_5_vl")
    seen = []
    original = vamba_attention.causal

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((query.shape[-2], key.shape[-2]))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(vamba_attention, "causal", spy)
    prefix = adapter.embed_prefix(adapter.build_prefix(frames(), FPS))
    first = int((prefix.frame_of >= 0).nonzero()[0])  # 4 groups of 15 tokens follow
    run(model, adapter, get_method("vamba", chunk_frames=1, sinks=2), PROMPTS[:1], chunk_size=10**6)
    layers = adapter.num_layers
    prefill = seen[:4 * layers]  # global call (text + group 0), groups 1-3, the closing text
    assert [q for q, _ in prefill[::layers]] == [first + 15, 15, 15, 15]
    assert all(keys == first + 2 + 15 for _, keys in prefill[layers:4 * layers])
    assert seen[4 * layers][1] == prefix.num_tokens  # the closing text reads the whole cache


# ---------------------------------------------------------------------------------------------
# Costs and budgets.

@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("chunk_frames,sinks,skip_mlp_from", [(1, 0, None), (2, 4, 1), (3, 1, 0), (None, 0, 0)])
def test_prefill_flops_count_the_hand_masks_pairs(family, chunk_frames, sinks, skip_mlp_from):
    model, _, adapter = tiny(family)
    method = get_method("vamba", chunk_frames=chunk_frames, sinks=sinks, skip_mlp_from=skip_mlp_from)
    result = run(model, adapter, method, PROMPTS[:1])
    baseline = run(model, adapter, get_method("baseline"), PROMPTS[:1])
    prefix = adapter.embed_prefix(adapter.build_prefix(frames(), FPS))
    allowed = hand_allowed(prefix.frame_of.tolist(), prefix.video_mask.tolist(), prefix.num_tokens, chunk_frames,
                           sinks)
    geometry = adapter.geometry
    missing = causal_pairs(prefix.num_tokens) - int(allowed.sum())
    assert (missing > 0) == (chunk_frames is not None)
    assert result.cost["attention_flops"] == baseline.cost["attention_flops"] - geometry.num_layers * score_flops(
        geometry.num_heads, geometry.head_dim, missing)
    skipping = 0 if skip_mlp_from is None else geometry.num_layers - skip_mlp_from
    assert result.cost["mlp_flops"] == baseline.cost["mlp_flops"] - skipping * 6 * prefix.num_video_tokens * (
        geometry.hidden_size * geometry.intermediate_size)
    with pytest.raises(ValueError, match="depend on the video layout"):
        method.estimate_prefill_flops(geometry, [10, 10])


def test_skipped_pairs_formula():
    # Groups of 4 tokens, chunks of 2 groups: chunk 1 (offset 8) skips 8 - sinks keys per query.
    assert skipped_pairs([4] * 4, 2, 0) == 8 * 8
    assert skipped_pairs([4] * 4, 2, 3) == 8 * 5
    assert skipped_pairs([4] * 4, 1, 0) == 4 * (4 + 8 + 12)
    assert skipped_pairs([4] * 4, 1, 0, trailing=1) == 4 * (4 + 8) + 5 * 12
    assert skipped_pairs([4] * 4, None, 0) == skipped_pairs([4] * 4, 4, 0) == 0


def test_budget_is_the_fraction_of_video_pairs_computed():
    geometry = tiny("qwen2_5_vl")[2].geometry
    tokens = TokenCounts(100, 64 * 256, ((64, 16, 16),))  # 64 groups of 256 tokens
    cls = method_class("vamba")
    assert cls.budget_settings(1.0, geometry, tokens) == {"chunk_frames": None}
    assert cls.budget_settings(0.5, geometry, tokens) == {"chunk_frames": 32}
    assert cls.budget_settings(0.25, geometry, tokens) == {"chunk_frames": 16}
    assert cls.budget_settings(0.125, geometry, tokens) == {"chunk_frames": 8}
    with pytest.raises(ValueError, match="budget must be in"):
        cls.budget_settings(0.0, geometry, tokens)
    with pytest.raises(ValueError, match="needs the video's temporal groups"):
        cls.budget_settings(0.5, geometry, None)


# ---------------------------------------------------------------------------------------------
# Failure paths and the CLI.

def test_bad_settings_are_refused():
    model, _, adapter = tiny("qwen2_5_vl")
    for settings, message in (({"chunk_frames": 0}, "chunk_frames must be an integer >= 1"),
                              ({"sinks": -1}, "sinks must be an integer >= 0"),
                              ({"skip_mlp_from": -2}, "skip_mlp_from must be a decoder layer index")):
        with pytest.raises(ValueError, match=message):
            get_method("vamba", **settings)
    with pytest.raises(ValueError, match="skip_mlp_from 2 is not below the model's 2 layers"), \
            get_method("vamba", skip_mlp_from=2).apply(model, adapter):
        pass
    assert get_method("vamba", chunk_frames="none").chunk_frames is None  # --set chunk_frames=none


def test_sliding_window_models_are_refused(monkeypatch):
    model, _, adapter = tiny("qwen2_5_vl")
    monkeypatch.setattr(adapter.text_config, "use_sliding_window", True, raising=False)
    with pytest.raises(ValueError, match="this model uses sliding windows"), get_method("vamba").apply(model, adapter):
        pass


def test_attention_refuses_a_mask_and_an_impossible_chunk():
    query, key = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 10, 16)
    with pytest.raises(ValueError, match="without padding"):
        vamba_attention.vamba_attention(None, query, key, key, torch.zeros(1, 1, 2, 10))
    plan = vamba_attention.ChunkPlan(sink_end=5, chunk_start=9, video_rows=None)  # queries start at 8
    with pytest.raises(ValueError, match="cannot hold queries from position 8"):
        vamba_attention.vamba_attention(None, query, key, key, None, **{vamba_attention.PLAN_KWARG: plan})


def test_apply_restores_the_model():
    model, _, adapter = tiny("qwen2_5_vl")
    before = [(dict(layer._forward_pre_hooks), dict(layer.mlp._forward_hooks)) for layer in adapter.decoder_layers]
    implementation = adapter.text_config._attn_implementation
    with get_method("vamba", skip_mlp_from=0).apply(model, adapter):
        assert adapter.text_config._attn_implementation == vamba_attention.ATTENTION_NAME
    assert adapter.text_config._attn_implementation == implementation
    assert [(dict(layer._forward_pre_hooks), dict(layer.mlp._forward_hooks))
            for layer in adapter.decoder_layers] == before


def test_eval_cli_runs_vamba(tmp_path):
    annotations, videos = write_dataset(tmp_path)
    out = tmp_path / "run"
    args = eval_args(annotations, videos, out)
    args[args.index("baseline")] = "vamba"
    assert main([*args, "--set", "chunk_frames=1", "--set", "skip_mlp_from=1"]) == 0
    decoded = [p for p in iter_jsonl(out / "predictions.jsonl") if p["error"] is None]
    assert len(decoded) == 8 and all(len(p["output_tokens"]) == 5 for p in decoded)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == {"name": "vamba", "chunk_frames": 1, "sinks": 0, "skip_mlp_from": 1}
    cost = decoded[0]["cost"]
    assert cost["kv_bytes"] == 2 * 2 * 16 * 4 * 2 * cost["prefix_tokens"]  # the KV cache stays full
    assert main([*args, "--set", "chunk_frames=0"]) == 1
