"""The shared attention paths of duokit/methods/attention.py against attention written out by hand
(softmax of masked scores): every path `causal` can take — transformers' sdpa call, the exact masked call,
the CPU flash pair merged by log-sum-exp, and the GPU path (`causal_expanded`, run here on CPU) — plus
the packed one-token decode and the log-sum-exp merge itself."""

from __future__ import annotations

import pytest
import torch

from duokit.methods.attention import (
    causal,
    causal_cpu,
    causal_expanded,
    flash_cpu,
    merge_by_lse,
    packed_decode,
)

Q_HEADS, KV_HEADS, DIM, SCALE = 4, 2, 8, 8**-0.5


class GroupedAttention(torch.nn.Module):
    """What transformers' sdpa call reads from an attention module."""
    is_causal = True
    num_key_value_groups = Q_HEADS // KV_HEADS


def qkv(q_len: int, kv_len: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, Q_HEADS, q_len, DIM, generator=generator)
    key, value = (torch.randn(1, KV_HEADS, kv_len, DIM, generator=generator) for _ in range(2))
    return query.to(dtype), key.to(dtype), value.to(dtype)


def by_hand(query, key, value, causal: bool = True) -> torch.Tensor:
    """Attention in float64, bottom-right causal (query i of q sees keys 0 .. kv - q + i) or over every key.
    [B, q, H, D]."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    key, value = (t.double().repeat_interleave(Q_HEADS // KV_HEADS, dim=1) for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * SCALE
    seen = torch.ones(q_len, kv_len, dtype=torch.bool)
    seen = seen.tril(kv_len - q_len) if causal else seen
    return (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (9, 9), (5, 13), (16, 40)])
@pytest.mark.parametrize("exact", [False, True])
def test_causal_is_bottom_right_causal_attention(q_len, kv_len, exact):
    query, key, value = qkv(q_len, kv_len)
    got = causal(GroupedAttention(), query, key, value, SCALE, exact=exact)
    assert got.shape == (1, q_len, Q_HEADS, DIM)
    torch.testing.assert_close(got.double(), by_hand(query, key, value), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(5, 13), (16, 40), (7, 7)])
def test_the_gpu_path_and_the_cpu_path_agree(q_len, kv_len):
    """`causal_expanded` is what `causal` runs off CPU; CI has no GPU, so it is checked here on CPU."""
    query, key, value = qkv(q_len, kv_len, seed=1)
    expected = by_hand(query, key, value)
    torch.testing.assert_close(causal_expanded(query, key, value, SCALE).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_cpu(query, key, value, SCALE).double(), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_paths_stay_within_bfloat16_rounding():
    query, key, value = qkv(16, 40, dtype=torch.bfloat16, seed=2)
    expected = by_hand(query, key, value)
    for path in (causal_expanded, causal_cpu):
        got = path(query, key, value, SCALE)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


def test_packed_decode_is_one_query_seeing_every_key():
    query, key, value = qkv(1, 11, seed=3)
    torch.testing.assert_close(packed_decode(query, key, value, SCALE).double(), by_hand(query, key, value),
                               atol=1e-5, rtol=1e-5)


def test_merge_by_lse_of_disjoint_key_sets_is_attention_over_their_union():
    query, key, value = qkv(3, 12, seed=4)
    parts = [flash_cpu(query, key[..., span, :], value[..., span, :], False, SCALE)
             for span in (slice(0, 5), slice(5, 6), slice(6, 12))]
    torch.testing.assert_close(merge_by_lse(parts).double(), by_hand(query, key, value, causal=False),
                               atol=1e-5, rtol=1e-5)


def test_flash_cpu_refuses_an_empty_key_set_instead_of_crashing():
    """torch's CPU flash kernel dies with SIGFPE on zero keys (torch 2.14.1); a chunk with no past keys
    must never reach it."""
    query, key, value = qkv(3, 0)
    with pytest.raises(ValueError, match="no keys"):
        flash_cpu(query, key, value, False, SCALE)
