"""The tries decoded together (duokit.decode_together) answer exactly as the tries decoded one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.data.vnbench import official_prompt, permuted_options
from duokit.decode_together import decode_tries_together, tries_attention
from duokit.engine import LM, SampleInput, Try, answer_tries
from duokit.methods import get_method
from duokit.metrics import kv_cache_bytes

OPTIONS = ["Alice", "Bob", "Carol", "Dave", "a much longer option that changes the suffix length"]
TRIES = [Try(official_prompt("What is the secret word?", options)) for options in permuted_options(OPTIONS[:4])]
# Suffixes of different lengths: padding must never be attended to, and each try keeps its own positions.
TRIES[1] = Try(official_prompt("What is the secret word?", OPTIONS[1:]))


def sample_for(adapter):
    if adapter.is_multimodal:
        return SampleInput(np.random.default_rng(0).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8), 0.5)
    return SampleInput(None, None, "The secret word of the day is written on a red card. " * 3)


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_tries_together_equal_tries_one_by_one(family, max_new_tokens):
    model, _, adapter = tiny(family)
    method, lm, sample = get_method("baseline"), LM(model, adapter), sample_for(adapter)
    with method.apply(model, adapter):
        expected = answer_tries(lm, method, sample, TRIES, chunk_size=16, max_new_tokens=max_new_tokens,
                                keep_logits=True)
        prefix = method.prepare_prefix(lm.embed(sample), sample, lm)
        suffixes = [adapter.suffix_ids(t.prompt, sample.frames is not None, sample.context) for t in TRIES]
        lm.decode_reserve = 0
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), 16)
        held = kv_cache_bytes(cache)
        before = [layer.keys.clone() for layer in cache.layers]
        logits = [[] for _ in TRIES]
        together = decode_tries_together(lm, cache, prefix, suffixes, max_new_tokens, logits)
    assert len({s.shape[1] for s in suffixes}) > 1
    assert together == [answer.tokens for answer in expected.answers]
    assert len({tuple(tokens) for tokens in together}) > 1
    for got, answer in zip(logits, expected.answers):
        torch.testing.assert_close(torch.stack(got), answer.logits, rtol=1e-4, atol=1e-4)
    # The prefilled cache is only read.
    assert kv_cache_bytes(cache) == held
    assert all(torch.equal(layer.keys, keys) for layer, keys in zip(cache.layers, before))


def test_the_attention_refuses_another_cache():
    query = torch.zeros(1, 4, 1, 16)
    with pytest.raises(TypeError, match="decode_tries_together"):
        tries_attention(None, query, query, query, None)


def test_the_engine_decodes_the_baselines_tries_together_unless_asked_for_exact_logits(monkeypatch):
    from duokit import engine

    calls = []

    def spy(*args, **kwargs):
        calls.append(len(args[3]))
        return decode_tries_together(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_tries_together", spy)
    model, _, adapter = tiny("qwen2_5_vl")
    method, lm, sample = get_method("baseline"), LM(model, adapter), sample_for(adapter)
    assert method.decodes_tries_together
    with method.apply(model, adapter):
        exact = answer_tries(lm, method, sample, TRIES, chunk_size=16, keep_logits=True)
        assert calls == []
        fast = answer_tries(lm, method, sample, TRIES, chunk_size=16)
        assert calls == [len(TRIES)]
        answer_tries(lm, method, sample, TRIES[:1], chunk_size=16)  # one try: nothing to share
        assert calls == [len(TRIES)]
    assert [a.tokens for a in fast.answers] == [a.tokens for a in exact.answers]
    assert all(a.logits is None and a.decode_s > 0 for a in fast.answers)
    # The batch holds the prefix once and, per try, the longest suffix + every new token but the last.
    cost = fast.cost
    longest = max(adapter.suffix_ids(t.prompt, True).shape[1] for t in TRIES)
    per_token = cost["kv_bytes"] // cost["prefix_tokens"]
    assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"] == cost["kv_bytes"] + per_token * 4 * (longest + 4)


def test_tries_together_can_be_turned_off_same_tokens_one_suffix_held():
    model, _, adapter = tiny("qwen2_5_vl")
    method, lm, sample = get_method("baseline"), LM(model, adapter), sample_for(adapter)
    with method.apply(model, adapter):
        together = answer_tries(lm, method, sample, TRIES, chunk_size=16)
        one_by_one = answer_tries(lm, method, sample, TRIES, chunk_size=16, tries_together=False)
    assert [a.tokens for a in one_by_one.answers] == [a.tokens for a in together.answers]
    longest = max(adapter.suffix_ids(t.prompt, True).shape[1] for t in TRIES)
    per_token = together.cost["kv_bytes"] // together.cost["prefix_tokens"]
    held = one_by_one.cost
    assert held["kv_bytes_peak"] == held["kv_bytes_planned"] <= held["kv_bytes"] + per_token * (longest + 4)
    assert held["kv_bytes_peak"] < together.cost["kv_bytes_peak"]
