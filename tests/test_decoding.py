"""Decoding without copies: the preallocated cache, restoring the prefix per try, the memory planner.

The exactness guards for these live elsewhere too (tests/test_engine.py: the engine's tokens equal
`generate`; tests/test_method_conformance.py: every method at its identity equals the baseline); here:
the preallocated cache holds and returns exactly what `DynamicCache` does, writes in place into one
allocation, and the in-place restore gives every try exactly what a deepcopy gave it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch
from _tiny_models import tiny
from transformers import DynamicCache

from duokit.data.vnbench import official_prompt, permuted_options
from duokit.engine import LM, SampleInput, Try, answer_tries
from duokit.methods import get_method
from duokit.methods.base import Method
from duokit.methods.duo.pattern import save_pattern
from duokit.methods.preallocated import PreallocatedCache, preallocated_cache
from duokit.metrics import kv_cache_bytes, plan_memory
from duokit.models.base import TokenCounts

TRIES = [Try(official_prompt("What is the secret word?", options)) for options in
         permuted_options(["Alice", "Bob", "Carol", "Dave"])]
CONTEXT = "The secret word of the day is written on a red card. " * 3


def feed(model, cache, ids, chunk):
    outputs = []
    for start in range(0, ids.shape[1], chunk):
        outputs.append(model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits)
    return torch.cat(outputs, dim=1)


def test_preallocated_cache_equals_dynamic_cache_and_appends_in_place():
    model, _, adapter = tiny("llama")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    dynamic, reserve = DynamicCache(config=model.config), 6
    cache = preallocated_cache(adapter.text_config, 34, reserve)
    assert isinstance(cache, PreallocatedCache)
    with torch.no_grad():
        assert torch.equal(feed(model, cache, ids[:, :34], 16), feed(model, dynamic, ids[:, :34], 16))
        addresses = [layer.storage["keys"].data_ptr() for layer in cache.layers]
        assert torch.equal(feed(model, cache, ids[:, 34:], 1), feed(model, dynamic, ids[:, 34:], 1))
    assert [layer.storage["keys"].data_ptr() for layer in cache.layers] == addresses  # no reallocation
    for layer, reference in zip(cache.layers, dynamic.layers):
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    # kv_cache_bytes counts the tokens held; the allocation is the prefix + the reserve, once.
    assert kv_cache_bytes(cache) == kv_cache_bytes(dynamic)
    per_token = kv_cache_bytes(cache) // 40
    assert cache.reserved_bytes() == per_token * (34 + reserve)
    assert cache.get_seq_length() == 40


def test_an_append_beyond_the_allocation_reallocates_and_stays_exact():
    model, _, adapter = tiny("llama")
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(1))
    cache, dynamic = preallocated_cache(adapter.text_config, 8, 2), DynamicCache(config=model.config)
    with torch.no_grad():
        assert torch.equal(feed(model, cache, ids, 7), feed(model, dynamic, ids, 7))
    # Chunks end at 7, 14, 21, 28, 30: the allocation of 8 + 2 grew at 14, 21 and 28 to the need + 2.
    assert cache.get_seq_length() == 30 and cache.reserved_bytes() == kv_cache_bytes(cache)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.layers[0].truncate(31)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].batch_repeat_interleave(2)


@dataclass
class CopyPerTry(Method):
    """The old engine: every try decodes on a deepcopy of the prefilled cache."""

    name = "test-copy-per-try"

    def prefix_restorer(self, cache):
        return lambda: copy.deepcopy(cache)


def duo(tmp_path, sparsity, sink=2, recent=4):
    _, _, adapter = tiny("qwen2_5_vl")
    gates = np.random.default_rng(0).random((adapter.num_layers, adapter.num_kv_heads))
    save_pattern(tmp_path / "pattern", gates, sink_size=sink, recent_size=recent)
    # per_layer: streaming heads in every layer, so a stale window in an early layer reaches the logits.
    return get_method("duo", pattern=str(tmp_path / "pattern"), sparsity=sparsity, sink=sink, recent=recent,
                      per_layer=True)


def answers(family, method, copying):
    model, _, adapter = tiny(family)
    sample = (SampleInput(np.random.default_rng(0).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8), 0.5)
              if adapter.is_multimodal else SampleInput(None, None, CONTEXT))
    if copying:  # the same method, its tries on deep copies
        copying_class = type("Copying", (type(method),), {"prefix_restorer": CopyPerTry.prefix_restorer})
        method = copying_class(**{field.name: getattr(method, field.name) for field in fields(method)})
    with method.apply(model, adapter):
        return answer_tries(LM(model, adapter), method, sample, TRIES, chunk_size=16, keep_logits=True)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llama"])
@pytest.mark.parametrize("sparsity", [None, 0.5, 0.75])
def test_restoring_the_prefix_in_place_equals_a_copy_per_try(family, sparsity, tmp_path):
    method = get_method("baseline") if sparsity is None else duo(tmp_path, sparsity)
    restored, copied = answers(family, method, False), answers(family, method, True)
    for got, want in zip(restored.answers, copied.answers, strict=True):
        assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert len({tuple(a.tokens) for a in restored.answers}) > 1  # the tries differ, so a leak would show
    assert restored.cost["kv_bytes_peak"] == copied.cost["kv_bytes_peak"] == restored.cost["kv_bytes_planned"]


def test_duo_restorer_keeps_the_prefilled_streaming_window(tmp_path):
    """sink 2 + recent 4: every try's suffix evicts the prefix's window, and the next try gets it back."""
    method = duo(tmp_path, 0.5)
    model, _, adapter = tiny("llama")
    lm = LM(model, adapter)
    with method.apply(model, adapter):
        prefix = method.prepare_prefix(lm.embed(SampleInput(None, None, CONTEXT)), None, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), 16)
        windows = [(layer.streaming_keys.clone(), layer.keys.clone()) for layer in cache.layers]
        restore = method.prefix_restorer(cache)  # the reserve is unknown (0): it saves every ring slot
        suffix = adapter.suffix_ids(TRIES[0].prompt, False, CONTEXT)
        lm.forward(restore(), adapter.positions(prefix.next_position, suffix.shape[1]), input_ids=suffix)
        mixed = next(i for i, layer in enumerate(cache.layers) if layer.plan.streaming_heads)
        assert not torch.equal(cache.layers[mixed].streaming_keys, windows[mixed][0])  # the suffix evicted it
        restore()
    for layer, (streaming, retrieval) in zip(cache.layers, windows):
        assert torch.equal(layer.streaming_keys, streaming) and torch.equal(layer.keys, retrieval)
        assert layer.get_seq_length() == prefix.num_tokens
    geometry = adapter.geometry
    streaming_heads = sum(len(layer.plan.streaming_heads) for layer in cache.layers)
    assert restore.nbytes == method.estimate_restore_kv_bytes(geometry, TokenCounts(prefix.num_tokens)) == (
        2 * streaming_heads * (4 + 1) * geometry.head_dim * geometry.dtype_bytes)


@pytest.mark.parametrize("recent", [4, 200])
def test_duo_streaming_buffer_is_allocated_once_written_in_place_and_planned(tmp_path, recent):
    """sink 2 + recent 4: a ring of 5 slots that wraps several times within each try; recent 200: a ring
    longer than a try, so the restorer saves only the slots a try of `reserve` tokens reaches. The
    buffers keep their storage, hold exactly the planned bytes, and the restorer saves what it plans."""
    method = duo(tmp_path, 0.5, sink=2, recent=recent)
    model, _, adapter = tiny("llama")
    lm, geometry = LM(model, adapter), adapter.geometry
    suffix = adapter.suffix_ids(TRIES[0].prompt, False, CONTEXT)
    new_tokens = 12
    lm.decode_reserve = reserve = suffix.shape[1] + new_tokens
    with method.apply(model, adapter):
        prefix = method.prepare_prefix(lm.embed(SampleInput(None, None, CONTEXT)), None, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), 16)
        # The allocation is the planned peak: prefix + reserve tokens (streaming heads: sink + recent + 1).
        assert cache.reserved_bytes() == method.estimate_kv_bytes(geometry, TokenCounts(prefix.num_tokens + reserve))
        prefilled = [layer.streaming_keys.clone() for layer in cache.layers]
        buffers = [(layer.storage["streaming_keys"], layer.storage["streaming_values"]) for layer in cache.layers]
        addresses = [(keys.data_ptr(), values.data_ptr()) for keys, values in buffers]
        restore = method.prefix_restorer(cache)
        whole_ring = method.estimate_restore_kv_bytes(geometry, TokenCounts(prefix.num_tokens))  # reserve unknown
        assert restore.nbytes == method.estimate_restore_kv_bytes(geometry, TokenCounts(prefix.num_tokens), reserve)
        assert (0 < restore.nbytes < whole_ring) if recent + 1 > reserve else restore.nbytes == whole_ring
        tries = []
        for _ in range(2):  # two tries of the same suffix: the second starts from the restored prefix
            length = prefix.num_tokens + suffix.shape[1]
            restore()
            assert all(torch.equal(layer.streaming_keys, keys) for layer, keys in zip(cache.layers, prefilled))
            hidden = lm.forward(cache, adapter.positions(prefix.next_position, suffix.shape[1]), input_ids=suffix)
            tries.append([])
            for step in range(new_tokens - 1):
                assert kv_cache_bytes(cache) == method.estimate_kv_bytes(geometry, TokenCounts(length))
                tries[-1].append(lm.next_token_logits(hidden))
                token = tries[-1][-1].argmax().view(1, 1)
                hidden = lm.forward(cache, adapter.positions(prefix.next_position + suffix.shape[1] + step, 1),
                                    input_ids=token)
                length += 1
                assert [(k.data_ptr(), v.data_ptr()) for k, v in buffers] == addresses  # written in place
            assert [(layer.storage["streaming_keys"].data_ptr(), layer.storage["streaming_values"].data_ptr())
                    for layer in cache.layers] == addresses  # never reallocated
        assert torch.equal(torch.stack(tries[0]), torch.stack(tries[1]))
        # A try longer than the reserve: with the whole ring saved the restore is still exact; with part
        # of it, the try overwrote slots nobody saved, and restoring refuses instead of lying.
        for _ in range(2):
            token = lm.next_token_logits(hidden).argmax().view(1, 1)
            hidden = lm.forward(cache, adapter.positions(prefix.next_position + length - prefix.num_tokens, 1),
                                input_ids=token)
            length += 1
        if recent + 1 > reserve:
            with pytest.raises(RuntimeError, match="larger reserve"):
                restore()
        else:
            restore()
            assert all(torch.equal(layer.streaming_keys, keys) for layer, keys in zip(cache.layers, prefilled))


def positions_as_tokens(first: int, count: int) -> torch.Tensor:
    """Keys/values of 2 KV heads (head 0 retrieval, head 1 streaming) whose one feature is the position."""
    return torch.arange(first, first + count, dtype=torch.float32).view(1, 1, count, 1).expand(1, 2, count, 1)


@pytest.mark.parametrize("sink,recent", [(2, 4), (0, 3), (3, 0), (5, 40)])
def test_duo_streaming_ring_holds_exactly_each_querys_window(sink, recent):
    """Tokens whose value is their position, fed in chunks of 1 and more: a decode step's streaming keys
    are exactly its window (sink + the `recent` tokens before it + itself, each once), a chunk's are the
    cached window + the chunk in position order, and the buffer is allocated once."""
    from duokit.methods.duo.cache import DuoLayer, HeadPlan

    layer = DuoLayer(HeadPlan((0,), (1,), sink, recent))
    past, address = 0, None
    for count in [1, 1, 3, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 50, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1]:
        keys, values = layer.update(positions_as_tokens(past, count), positions_as_tokens(past, count) + 0.5)
        streaming = keys.streaming[0, 0, :, 0].tolist()
        assert [v - 0.5 for v in values.streaming[0, 0, :, 0].tolist()] == streaming
        assert keys.retrieval[0, 0, :, 0].tolist() == list(range(past + count))
        cached = list(range(min(past, sink))) + list(range(max(sink, past - recent), past))
        if count == 1:  # the window of the query at `past`, in ring order
            assert sorted(streaming) == [j for j in range(past + 1) if j < sink or past - j <= recent]
        else:  # position order; entry i >= sink is the token at i + offset
            assert streaming == cached + list(range(past, past + count))
            assert all(position == (i if i < sink else i + keys.streaming_offset)
                       for i, position in enumerate(streaming[:len(cached)]))
        past += count
        buffer = layer.storage["streaming_keys"]
        assert buffer.shape[-2] == sink + recent + 1 and (address is None or buffer.data_ptr() == address)
        address = buffer.data_ptr()
        assert layer.streaming_keys.shape[-2] == min(past, sink + recent + 1)


@pytest.mark.parametrize("sink,recent", [(2, 4), (3, 10)])
@pytest.mark.parametrize("prefix_length", [5, 14, 40])
@pytest.mark.parametrize("reserve", [0, 1, 3, 11, 30])
def test_duo_restorer_saves_exactly_the_prefix_slots_a_try_overwrites(sink, recent, prefix_length, reserve):
    from duokit.methods.duo.cache import DuoCache, HeadPlan, duo_restore_kv_bytes

    plan = HeadPlan((0,), (1,), sink, recent)
    cache = DuoCache([plan], prefix_length + reserve, reserve)
    cache.update(positions_as_tokens(0, prefix_length), positions_as_tokens(0, prefix_length), 0)
    layer = cache.layers[0]
    prefilled = layer.streaming_keys.clone()
    restore = cache.prefix_restorer()
    assert restore.nbytes == duo_restore_kv_bytes([plan], 1, prefix_length, reserve, 4)
    longest = reserve or 2 * (sink + recent + 1)  # reserve 0: any length
    for length in range(1, longest + 1):  # tries of every length up to the reserve: a suffix, then steps
        restore()
        assert torch.equal(layer.streaming_keys, prefilled) and layer.get_seq_length() == prefix_length
        suffix = max(1, length // 2)
        cache.update(positions_as_tokens(prefix_length, suffix), positions_as_tokens(prefix_length, suffix), 0)
        for position in range(prefix_length + suffix, prefix_length + length):
            cache.update(positions_as_tokens(position, 1), positions_as_tokens(position, 1), 0)
    # The longest try overwrote exactly the saved slots (K and V, 1 head, 1 feature, float32): none is saved in vain.
    overwritten = (layer.storage["streaming_keys"][..., :prefilled.shape[-2], :] != prefilled).sum().item()
    assert restore.nbytes == 2 * 4 * overwritten
    restore()
    assert torch.equal(layer.streaming_keys, prefilled) and layer.get_seq_length() == prefix_length


def test_planner_counts_one_cache_and_what_restoring_keeps(tmp_path):
    model, _, adapter = tiny("qwen2_5_vl")
    method = duo(tmp_path, 0.5)
    plan = plan_memory(model, adapter, method, 4, 96, 128, suffix_tokens=50, max_new_tokens=5)
    text = plan.prefix_tokens - plan.video_tokens
    grids = adapter.video_grids(adapter.build_prefix(np.zeros((4, 96, 128, 3), dtype=np.uint8), fps=1.0))
    held = TokenCounts(text + 55, plan.video_tokens, grids)
    prefix = TokenCounts(text, plan.video_tokens, grids)
    geometry = adapter.geometry
    assert plan.kv_bytes == (method.estimate_kv_bytes(geometry, held)
                             + method.estimate_restore_kv_bytes(geometry, prefix)) > 0

    class OwnCache(Method):
        """A method with its own cache, which has no `prefix_restorer`: each try gets a deepcopy."""

        name = "test-own-cache"

        def new_cache(self, lm, prefix):
            return DynamicCache(config=lm.adapter.text_config)

    own = OwnCache()
    cache = own.new_cache(LM(model, adapter), None)
    restore = own.prefix_restorer(cache)
    assert restore() is not cache and restore() is not restore()
    planned = plan_memory(model, adapter, own, 4, 96, 128, suffix_tokens=50, max_new_tokens=5)
    baseline = get_method("baseline")
    assert planned.kv_bytes == baseline.estimate_kv_bytes(geometry, held) + baseline.estimate_kv_bytes(geometry, prefix)


def test_sliding_window_layers_keep_dynamic_cache_and_tries_apart():
    from transformers import Qwen2Config

    from duokit.decode_together import full_attention_only

    full = Qwen2Config(num_hidden_layers=4)
    sliding = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=8)
    assert full_attention_only(full) and not full_attention_only(sliding)
    assert isinstance(preallocated_cache(full, 10, 2), PreallocatedCache)
    cache = preallocated_cache(sliding, 10, 2)
    assert type(cache) is DynamicCache and cache.layers[-1].is_sliding
