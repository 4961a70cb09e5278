"""DuoAttention inference on tiny models: identity with sdpa, a dense Λ-mask reference, exact KV bytes.

The reference attention below is written independently of duokit.methods.duo: eager softmax over
the full (uncompressed) KV with a per-head mask — causal for retrieval heads, Λ-shaped (sink + the
`recent` preceding tokens + itself) for streaming heads — run with transformers' own DynamicCache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import duokit.methods.duo.attention as duo_attention
from duokit.engine import LM
from duokit.methods.base import get_method
from duokit.methods.duo.pattern import save_pattern
from duokit.metrics import kv_cache_bytes
from duokit.models import load_vlm
from duokit.models.base import TokenCounts

REFERENCE = "duokit_test_lambda_reference"
NEW_TOKENS = 5


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    streaming_kv_heads, sink, recent, full_first_tokens = module.reference_spec
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_len, kv_len = query.shape[2], key.shape[2]
    query_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    key_pos = torch.arange(kv_len)[None, :]
    causal = key_pos <= query_pos
    lambda_mask = causal & ((key_pos < sink) | (query_pos - key_pos <= recent) | (query_pos < full_first_tokens))
    streaming = torch.tensor([h // groups in streaming_kv_heads for h in range(query.shape[1])])
    mask = torch.where(streaming[:, None, None], lambda_mask, causal)
    scores = (query @ key.transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, reference_attention)


@pytest.fixture(scope="module")
def llama():
    model, _, adapter = load_vlm("tiny:llama", dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    return model, adapter, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def video_model(family: str):
    model, _, adapter = load_vlm(f"tiny:{family}", dtype=torch.float32, device="cpu")
    frames = np.random.RandomState(0).randint(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    inputs = adapter.build_inputs(frames, 2.0, "What colour is the needle? A. red B. blue C. green D. white")
    return model, adapter, inputs


@pytest.fixture(scope="module")
def qwen():
    return video_model("qwen2_5_vl")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl", "llava_onevision"])
def other_vlm(request):
    return video_model(request.param)


MODELS = ["llama", "qwen"]


def duo(tmp_path, gates, **settings):
    save_pattern(tmp_path / "pattern", np.asarray(gates, dtype=float), sink_size=128, recent_size=256)
    return get_method("duo", pattern=str(tmp_path / "pattern"), **settings)


def generate(model, inputs, cache=None):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def sequence_length(inputs) -> int:
    return inputs["input_ids"].shape[1] + NEW_TOKENS


@pytest.mark.parametrize("name", MODELS)
def test_all_retrieval_is_identical_to_sdpa(name, request, tmp_path):
    """Plumbing only: at sparsity 0 every KV head is a retrieval head, so `duo` must be plain causal
    attention. `model.generate` with the method applied (its attention function, selected for the
    language model, and a `DuoCache`) gives tokens and logits bit-identical to the model's own sdpa
    attention and cache (tiny Llama, tiny Qwen2.5-VL with a video). No streaming head runs here.

    The streaming heads are checked by `test_all_streaming_with_window_covering_sequence_is_identical`
    (streaming path, window covering everything), `test_mixed_pattern_matches_dense_reference` (mixed
    patterns against an independent dense Λ-mask reference, chunked prefill + decoding),
    `test_other_video_families` and `test_full_first_chunk_flag_matches_reference` below; the streaming
    ring buffer and the per-try restorer by the `test_duo_*` tests of tests/test_decoding.py."""
    model, adapter, inputs = request.getfixturevalue(name)
    tokens, logits = generate(model, inputs)
    method = duo(tmp_path, np.random.RandomState(1).rand(adapter.num_layers, adapter.num_kv_heads),
                 sparsity=0.0, sink=2, recent=3)
    with method.apply(model, adapter):
        duo_tokens, duo_logits = generate(model, inputs, method.new_cache(LM(model, adapter), None))
    assert torch.equal(duo_tokens, tokens)
    assert torch.equal(duo_logits, logits)


@pytest.mark.parametrize("name", MODELS)
def test_all_streaming_with_window_covering_sequence_is_identical(name, request, tmp_path):
    model, adapter, inputs = request.getfixturevalue(name)
    tokens, logits = generate(model, inputs)
    length = sequence_length(inputs)
    method = duo(tmp_path, np.ones((adapter.num_layers, adapter.num_kv_heads)), sparsity=1.0,
                 sink=4, recent=length - 4)
    with method.apply(model, adapter):
        cache = method.new_cache(LM(model, adapter), None)
        duo_tokens, duo_logits = generate(model, inputs, cache)
    assert all(not layer.plan.retrieval_heads for layer in cache.layers)
    assert torch.equal(duo_tokens, tokens)
    assert torch.equal(duo_logits, logits)


def run(model, adapter, inputs, cache, chunk: int):
    """Chunked prefill of the whole prompt, then greedy decode (the engine's path: the language model
    called directly with explicit positions); logits of every position."""
    prefix = adapter.embed_prefix(inputs)

    def forward(embeds, positions, **extra):
        hidden = adapter.language_model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                        use_cache=True, **extra).last_hidden_state
        return adapter.lm_head(hidden)

    logits = []
    for start in range(0, prefix.num_tokens, chunk):
        stop = min(start + chunk, prefix.num_tokens)
        logits.append(forward(prefix.inputs_embeds[:, start:stop], prefix.position_ids[..., start:stop],
                              **adapter.chunk_inputs(prefix, start, stop)))
    token = logits[-1][:, -1:].argmax(-1)
    for step in range(NEW_TOKENS):
        logits.append(forward(model.get_input_embeddings()(token), adapter.positions(prefix.next_position + step, 1)))
        token = logits[-1][:, -1:].argmax(-1)
    return torch.cat(logits, dim=1)


def reference_run(model, adapter, inputs, retrieval, sink, recent, full_first_tokens=0):
    previous = model.config.get_text_config()._attn_implementation
    is_vlm = model.config.get_text_config() is not model.config
    model.set_attn_implementation({"text_config": REFERENCE} if is_vlm else REFERENCE)
    for index, layer in enumerate(adapter.decoder_layers):
        streaming = {h for h, keep in enumerate(retrieval[index]) if not keep}
        layer.self_attn.reference_spec = (streaming, sink, recent, full_first_tokens)
    try:
        return run(model, adapter, inputs, DynamicCache(config=model.config.get_text_config()), chunk=10**9)
    finally:
        model.set_attn_implementation({"text_config": previous} if is_vlm else previous)


MIXED_GATES = {"contiguous": [[0.1, 0.9], [0.2, 0.8]], "second_head": [[0.9, 0.1], [0.05, 0.02]]}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gates", sorted(MIXED_GATES))
@pytest.mark.parametrize("chunk,query_block", [(1000, 512), (37, 512), (16, 5)])
def test_mixed_pattern_matches_dense_reference(name, gates, chunk, query_block, request, tmp_path, monkeypatch):
    model, adapter, inputs = request.getfixturevalue(name)
    monkeypatch.setattr(duo_attention, "QUERY_BLOCK", query_block)
    method = duo(tmp_path, MIXED_GATES[gates], sparsity=0.5, sink=4, recent=19)
    expected = reference_run(model, adapter, inputs, method.retrieval, sink=4, recent=19)
    with method.apply(model, adapter):
        cache = method.new_cache(LM(model, adapter), None)
        logits = run(model, adapter, inputs, cache, chunk)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=5e-5)
    # The streaming heads really changed the result (the test would not notice a dense fallback otherwise).
    dense = run(model, adapter, inputs, DynamicCache(config=model.config.get_text_config()), chunk=10**9)
    assert not torch.allclose(dense, expected, atol=1e-3)


def test_bfloat16_follows_the_dense_reference_and_holds_two_bytes_per_value(llama, tmp_path):
    """The dtype GPUs run (sm80+): Duo on a bfloat16 copy of tiny Llama stays within bfloat16 rounding of
    the float32 Λ-mask reference — far closer than full attention is — and its cache holds the formula's
    bytes at 2 bytes per value."""
    model, adapter, inputs = llama
    model16, _, adapter16 = load_vlm("tiny:llama", dtype=torch.bfloat16, device="cpu")
    method = duo(tmp_path, MIXED_GATES["contiguous"], sparsity=0.5, sink=4, recent=19)
    expected = reference_run(model, adapter, inputs, method.retrieval, sink=4, recent=19)
    dense = run(model, adapter, inputs, DynamicCache(config=model.config.get_text_config()), chunk=10**9)
    with method.apply(model16, adapter16):
        cache = method.new_cache(LM(model16, adapter16), None)
        logits = run(model16, adapter16, inputs, cache, chunk=37)
    assert logits.dtype == torch.bfloat16
    error, gap = (logits.float() - expected).abs().max(), (dense - expected).abs().max()
    assert error < gap / 4, (error, gap)
    assert adapter16.geometry.dtype_bytes == 2
    length = inputs["input_ids"].shape[1] + NEW_TOKENS
    assert kv_cache_bytes(cache) == method.estimate_kv_bytes(adapter16.geometry, TokenCounts(length))
    assert kv_cache_bytes(cache) * 2 == method.estimate_kv_bytes(adapter.geometry, TokenCounts(length))


def test_other_video_families(other_vlm, tmp_path):
    """Qwen2-VL, Qwen3-VL (deepstack) and LLaVA-OneVision: identity at sparsity 0, reference when mixed."""
    model, adapter, inputs = other_vlm
    tokens, logits = generate(model, inputs)
    method = duo(tmp_path, MIXED_GATES["second_head"], sparsity=0.0)
    with method.apply(model, adapter):
        duo_tokens, duo_logits = generate(model, inputs, method.new_cache(LM(model, adapter), None))
    assert torch.equal(duo_tokens, tokens) and torch.equal(duo_logits, logits)
    method = duo(tmp_path, MIXED_GATES["second_head"], sparsity=0.5, sink=2, recent=7)
    expected = reference_run(model, adapter, inputs, method.retrieval, sink=2, recent=7)
    with method.apply(model, adapter):
        observed = run(model, adapter, inputs, method.new_cache(LM(model, adapter), None), chunk=11)
    torch.testing.assert_close(observed, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("name", MODELS)
def test_full_first_chunk_flag_matches_reference(name, request, tmp_path):
    model, adapter, inputs = request.getfixturevalue(name)
    chunk = 40
    method = duo(tmp_path, MIXED_GATES["second_head"], sparsity=0.5, sink=4, recent=19, full_first_chunk=True)
    expected = reference_run(model, adapter, inputs, method.retrieval, 4, 19, full_first_tokens=chunk)
    with method.apply(model, adapter):
        logits = run(model, adapter, inputs, method.new_cache(LM(model, adapter), None), chunk)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("name", MODELS)
def test_without_duo_cache_the_attention_masks_the_full_cache(name, request, tmp_path):
    model, adapter, inputs = request.getfixturevalue(name)
    method = duo(tmp_path, MIXED_GATES["contiguous"], sparsity=0.5, sink=4, recent=19)
    expected = reference_run(model, adapter, inputs, method.retrieval, sink=4, recent=19)
    with method.apply(model, adapter):
        logits = run(model, adapter, inputs, DynamicCache(config=model.config.get_text_config()), chunk=23)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_kv_bytes_held_equal_the_formula(llama, tmp_path, sparsity, chunk):
    model, adapter, _ = llama
    method = duo(tmp_path, [[0.3, 0.7], [0.1, 0.9]], sparsity=sparsity, sink=5, recent=20)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(2))
    with method.apply(model, adapter):
        cache = method.new_cache(LM(model, adapter), None)
        seen = 0
        for length in (3, 25, 26, 60, 90):  # below, at and above sink + recent
            for start in range(seen, length, chunk):
                stop = min(start + chunk, length)
                model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True)
            seen = length
            formula = method.estimate_kv_bytes(adapter.geometry, TokenCounts(length))
            assert kv_cache_bytes(cache) == formula
            assert cache.get_seq_length() == length
            assert cache.get_mask_sizes(1, 0) == (length + 1, 0)
    full = 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * 90 * 4
    assert kv_cache_bytes(cache) < full or sparsity == 0.0


def test_qwen_video_kv_bytes_and_deepcopy(qwen, tmp_path):
    model, adapter, inputs = qwen
    method = duo(tmp_path, MIXED_GATES["second_head"], sparsity=0.5, sink=4, recent=19)
    prefix = adapter.embed_prefix(inputs)
    with method.apply(model, adapter), torch.no_grad():
        cache = method.new_cache(LM(model, adapter), None)
        model(inputs_embeds=prefix.inputs_embeds, position_ids=prefix.position_ids, past_key_values=cache)
        assert kv_cache_bytes(cache) == method.estimate_kv_bytes(adapter.geometry, prefix.token_counts)
        twin = copy.deepcopy(cache)
        token = torch.tensor([[65]])
        step = {"inputs_embeds": model.get_input_embeddings()(token),
                "position_ids": adapter.positions(prefix.next_position, 1), "use_cache": True}
        first = model(past_key_values=cache, **step).logits
        second = model(past_key_values=twin, **step).logits
    assert torch.equal(first, second)
    assert twin.get_seq_length() == cache.get_seq_length() == prefix.num_tokens + 1


def test_apply_sets_the_language_model_only_and_restores(qwen, tmp_path):
    model, adapter, _ = qwen
    method = duo(tmp_path, MIXED_GATES["contiguous"])
    with method.apply(model, adapter):
        assert model.config.text_config._attn_implementation == duo_attention.ATTENTION_NAME
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert all(hasattr(layer.self_attn, "duokit_duo_plan") for layer in adapter.decoder_layers)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(hasattr(layer.self_attn, "duokit_duo_plan") for layer in adapter.decoder_layers)


def test_pattern_of_the_wrong_shape_is_refused(llama, tmp_path):
    model, adapter, _ = llama
    method = duo(tmp_path, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"full_attention_heads.tsv.*\(3, 2\).*\(2, 2\)"), method.apply(model, adapter):
        pass
    assert model.config._attn_implementation == "sdpa"


def test_duo_cache_refuses_batches_and_cropping(llama, tmp_path):
    model, adapter, _ = llama
    method = duo(tmp_path, MIXED_GATES["contiguous"])
    cache = method.new_cache(LM(model, adapter), None)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(NotImplementedError):
        cache.crop(-1)
