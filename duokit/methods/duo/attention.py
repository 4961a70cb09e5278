"""The `duokit_duo` attention function (registered with transformers' `AttentionInterface`).

Retrieval KV heads attend causally to every token. Streaming KV heads attend to a Λ-shaped window:
query at position p sees key j iff j <= p and (j < sink or p - j <= recent), i.e. the sink tokens,
the `recent` preceding tokens and itself. This is exactly what the official deploy code gives at
decode (sink + recent cached tokens + the new one, duoattention.md §8.2), and it does not depend on
the prefill chunk size, because the cache keeps exactly the tokens the next query can see.

No O(T²) mask is built: decode and unevicted chunks are mask-free sdpa over the sliced KV (a later
retrieval chunk on CPU: two mask-free flash calls merged by log-sum-exp); streaming prefill runs sdpa
over query blocks, each against sink + its own window only (a block x (sink + recent + block) mask).
With `full_first_chunk` the first chunk runs full attention on every head, as the official code does
(§8.2). Batch size 1; padding masks are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from duokit.methods.duo.cache import SplitKV, head_index, select_heads

ATTENTION_NAME = "duokit_duo"
# Streaming prefill processes this many queries per sdpa call; the mask is block x (sink + recent + block).
QUERY_BLOCK = 512


def duo_attention(module: torch.nn.Module, query: torch.Tensor, key: SplitKV | torch.Tensor,
                  value: SplitKV | torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with retrieval and streaming heads; returns `[B, q_len, H_q, D]` as transformers expects."""
    if attention_mask is not None:
        raise ValueError("duokit_duo attention supports batch size 1 without padding (got an attention mask)")
    if not isinstance(key, SplitKV):
        key, value = _split_uncached(module, query, key, value)
    groups = module.num_key_value_groups
    outputs = []
    if key.retrieval_heads:
        query_heads = _query_heads(key.retrieval_heads, groups)
        retrieval_query = select_heads(query, query_heads)
        if query.shape[-2] == 1 and key.streaming_heads and not dropout:
            output = _packed_decode(retrieval_query, key.retrieval, value.retrieval, scaling)
        else:  # an all-retrieval layer keeps transformers' own call: bit-identical to the baseline
            output = _causal(module, retrieval_query, key.retrieval, value.retrieval, scaling, dropout)
        outputs.append((query_heads, output))
    if key.streaming_heads:
        query_heads = _query_heads(key.streaming_heads, groups)
        output = _streaming(module, select_heads(query, query_heads), key, value, scaling, dropout)
        outputs.append((query_heads, output))
    if len(outputs) == 1:
        return outputs[0][1], None
    batch, num_heads, q_len, _ = query.shape
    attn_output = query.new_empty(batch, q_len, num_heads, value.retrieval.shape[-1])
    for query_heads, output in outputs:  # back to the model's head order
        attn_output.index_copy_(2, head_index(query_heads, query.device), output)
    return attn_output, None


def _query_heads(kv_heads: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """Query heads served by `kv_heads` (`repeat_kv` order: KV head h serves h·groups … h·groups+groups−1)."""
    return tuple(h * groups + g for h in kv_heads for g in range(groups))


def _split_uncached(module, query, key, value) -> tuple[SplitKV, SplitKV]:
    """Plain tensors (no `DuoCache`, e.g. `use_cache=False`): every token is present; mask, save nothing."""
    plan = getattr(module, "duokit_duo_plan", None)
    if plan is None:
        raise RuntimeError("duokit_duo attention needs the `duo` method applied (`with method.apply(model, adapter)`)")
    retrieval_heads, streaming_heads, sink, recent, full_first_chunk = plan
    layout = {"retrieval_heads": retrieval_heads, "streaming_heads": streaming_heads, "sink": sink, "recent": recent,
              "past_length": key.shape[-2] - query.shape[-2], "streaming_offset": 0,
              "full_first_chunk": full_first_chunk}
    return (SplitKV(select_heads(key, retrieval_heads), select_heads(key, streaming_heads), **layout),
            SplitKV(select_heads(value, retrieval_heads), select_heads(value, streaming_heads), **layout))


def _causal(module, query, key, value, scaling, dropout) -> torch.Tensor:
    """Causal attention aligned bottom-right; transformers' own sdpa path when no mask is needed."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len == 1 or q_len == kv_len:
        # Same call as the baseline, so an all-retrieval layer reproduces it bit for bit.
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)[0]
    if query.device.type == "cpu" and not dropout:
        return _causal_cpu(query, key, value, scaling)
    # A masked GQA call falls back to the math kernel, which materialises q_len x kv_len scores per head;
    # expand the KV heads instead, as transformers' sdpa path does (CUDA kernels take this mask unmaterialised).
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(q_len, kv_len),
                                            dropout_p=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous()


def _packed_decode(query, key, value, scaling) -> torch.Tensor:
    """One query token: the query heads of each KV head become that head's query rows (transformers'
    `pack_gqa`), so each KV head is read once per step, not once per query head as with `enable_gqa`
    (3x faster on CPU at 32k keys). No mask is needed: the single query sees every cached key."""
    batch, num_heads, _, head_dim = query.shape
    packed = query.reshape(batch, key.shape[1], num_heads // key.shape[1], head_dim)
    return F.scaled_dot_product_attention(packed, key, value, scale=scaling).reshape(batch, 1, num_heads, head_dim)


def _causal_cpu(query, key, value, scaling) -> torch.Tensor:
    """Bottom-right causal attention as two mask-free calls merged by their log-sum-exp: every query sees
    all past keys, and the chunk's own keys causally (q_len = kv_len, top-left = bottom-right).

    On CPU a masked call would materialise the q_len x kv_len mask (then a float copy of it inside sdpa)
    and expand the KV heads; here the CPU flash kernel takes the KV heads as they are (GQA) and skips the
    masked half of the in-chunk blocks. Equal to the masked call up to float rounding.
    """
    past = key.shape[-2] - query.shape[-2]
    past_output, past_lse = _flash_cpu(query, key[..., :past, :], value[..., :past, :], False, scaling)
    chunk_output, chunk_lse = _flash_cpu(query, key[..., past:, :], value[..., past:, :], True, scaling)
    lse = torch.logaddexp(past_lse, chunk_lse)
    # [B, H, q] weights -> [B, q, H, 1]; the kernel's outputs are [B, q, H, D] in memory, so no copy here.
    output = (past_output.transpose(1, 2) * (past_lse - lse).exp().transpose(1, 2)[..., None]
              + chunk_output.transpose(1, 2) * (chunk_lse - lse).exp().transpose(1, 2)[..., None])
    return output.to(query.dtype)


def _flash_cpu(query, key, value, is_causal, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa's CPU flash kernel, which also returns the log-sum-exp (float32) and handles GQA natively."""
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                            scale=scaling)
    return output.float(), lse


def _streaming(module, query, key: SplitKV, value: SplitKV, scaling, dropout) -> torch.Tensor:
    q_len, length = query.shape[-2], key.streaming.shape[-2]
    first_query = key.past_length
    oldest_tail_position = key.sink + key.streaming_offset  # position of the first non-sink entry
    if (key.full_first_chunk and first_query == 0) or first_query + q_len - 1 - oldest_tail_position <= key.recent:
        # Every cached entry is inside every query's window (always so at decode): plain causal attention.
        return _causal(module, query, key.streaming, value.streaming, scaling, dropout)
    groups = query.shape[1] // key.streaming.shape[1]
    sink_entries = min(key.sink, length)
    blocks = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        q_first, q_last = first_query + start, first_query + stop - 1
        # Entries (not positions) of this block's window; entries >= sink sit at position entry + offset.
        window_end = q_last + 1 - key.streaming_offset
        window_start = max(sink_entries, q_first - key.recent - key.streaming_offset)
        entries = torch.cat([torch.arange(sink_entries, device=query.device),
                             torch.arange(window_start, window_end, device=query.device)])
        key_positions = torch.where(entries < key.sink, entries, entries + key.streaming_offset)
        query_positions = torch.arange(q_first, q_last + 1, device=query.device)[:, None]
        mask = (key_positions <= query_positions) & (
            (key_positions < key.sink) | (query_positions - key_positions <= key.recent))
        block_keys = _window(key.streaming, sink_entries, window_start, window_end).repeat_interleave(groups, dim=1)
        block_values = _window(value.streaming, sink_entries, window_start, window_end).repeat_interleave(groups, dim=1)
        blocks.append(F.scaled_dot_product_attention(query[:, :, start:stop], block_keys, block_values, attn_mask=mask,
                                                     dropout_p=dropout, scale=scaling))
    return torch.cat(blocks, dim=-2).transpose(1, 2).contiguous()


def _window(states: torch.Tensor, sink_entries: int, start: int, end: int) -> torch.Tensor:
    return torch.cat([states[..., :sink_entries, :], states[..., start:end, :]], dim=-2)


def register() -> None:
    """Make `duokit_duo` a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, duo_attention)
