"""The `duokit_duo` attention function (registered with transformers' `AttentionInterface`).

Retrieval KV heads attend causally to every token. Streaming KV heads attend to a Λ-shaped window:
query at position p sees key j iff j <= p and (j < sink or p - j <= recent), i.e. the sink tokens,
the `recent` preceding tokens and itself (duokit's one meaning of `recent`, shared with gate training;
docs/duoattention.md). This is exactly what the official deploy code gives at decode (sink + recent
cached tokens + the new one), and it does not depend on the prefill chunk size, because the cache
keeps exactly the tokens the next query can see.

No O(T²) mask is built: decode and unevicted chunks are mask-free sdpa over the sliced KV (the shared
`duokit.methods.attention.causal`: on CPU a later retrieval chunk is two mask-free flash calls merged
by log-sum-exp); streaming prefill runs sdpa over query blocks, each against sink + its own window
only (a block x (sink + recent + block) mask). With `full_first_chunk` the first chunk runs full
attention on every head, as the official code does. Batch size 1; padding masks are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from duokit.methods.attention import causal, packed_decode
from duokit.methods.duo.cache import HeadPlan, SplitKV, head_index, select_heads

ATTENTION_NAME = "duokit_duo"
# Streaming prefill processes this many queries per sdpa call; the mask is block x (sink + recent + block).
QUERY_BLOCK = 512
# The attribute through which `Duo.apply` gives each attention module its layer's `HeadPlan`.
PLAN_ATTRIBUTE = "duokit_duo_plan"


def duo_attention(module: torch.nn.Module, query: torch.Tensor, key: SplitKV | torch.Tensor,
                  value: SplitKV | torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with retrieval and streaming heads; returns `[B, q_len, H_q, D]` as transformers expects."""
    if attention_mask is not None:
        raise ValueError("duokit_duo attention supports batch size 1 without padding (got an attention mask)")
    if not isinstance(key, SplitKV):
        key, value = _split_uncached(module, query, key, value)
    plan, groups = key.plan, module.num_key_value_groups
    outputs = []
    if plan.retrieval_heads:
        query_heads = _query_heads(plan.retrieval_heads, groups)
        retrieval_query = select_heads(query, query_heads)
        exact = plan.exact and not plan.streaming_heads
        if query.shape[-2] == 1 and not exact and not dropout:
            output = packed_decode(retrieval_query, key.retrieval, value.retrieval, scaling)
        else:  # an all-retrieval layer keeps transformers' own call: bit-identical to the baseline
            output = causal(module, retrieval_query, key.retrieval, value.retrieval, scaling, dropout, exact=exact)
        outputs.append((query_heads, output))
    if plan.streaming_heads:
        query_heads = _query_heads(plan.streaming_heads, groups)
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
    plan: HeadPlan | None = getattr(module, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise RuntimeError("duokit_duo attention needs the `duo` method applied (`with method.apply(model, adapter)`)")
    past_length = key.shape[-2] - query.shape[-2]
    return (SplitKV(select_heads(key, plan.retrieval_heads), select_heads(key, plan.streaming_heads), plan,
                    past_length, 0),
            SplitKV(select_heads(value, plan.retrieval_heads), select_heads(value, plan.streaming_heads), plan,
                    past_length, 0))


def _streaming(module, query, key: SplitKV, value: SplitKV, scaling, dropout) -> torch.Tensor:
    q_len, length, plan = query.shape[-2], key.streaming.shape[-2], key.plan
    first_query = key.past_length
    oldest_tail_position = plan.sink + key.streaming_offset  # position of the first non-sink entry
    if (plan.full_first_chunk and first_query == 0) or first_query + q_len - 1 - oldest_tail_position <= plan.recent:
        # Every cached entry is inside every query's window (always so at decode): plain causal attention.
        return causal(module, query, key.streaming, value.streaming, scaling, dropout)
    groups = query.shape[1] // key.streaming.shape[1]
    sink_entries = min(plan.sink, length)
    blocks = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        q_first, q_last = first_query + start, first_query + stop - 1
        # Entries (not positions) of this block's window; entries >= sink sit at position entry + offset.
        window_end = q_last + 1 - key.streaming_offset
        window_start = max(sink_entries, q_first - plan.recent - key.streaming_offset)
        entries = torch.cat([torch.arange(sink_entries, device=query.device),
                             torch.arange(window_start, window_end, device=query.device)])
        key_positions = torch.where(entries < plan.sink, entries, entries + key.streaming_offset)
        query_positions = torch.arange(q_first, q_last + 1, device=query.device)[:, None]
        mask = (key_positions <= query_positions) & (
            (key_positions < plan.sink) | (query_positions - key_positions <= plan.recent))
        block_keys = _window(key.streaming, sink_entries, window_start, window_end).repeat_interleave(groups, dim=1)
        block_values = _window(value.streaming, sink_entries, window_start, window_end).repeat_interleave(groups, dim=1)
        blocks.append(F.scaled_dot_product_attention(query[:, :, start:stop], block_keys, block_values, attn_mask=mask,
                                                     dropout_p=dropout, scale=scaling))
    return torch.cat(blocks, dim=-2).transpose(1, 2).contiguous()


def _window(states: torch.Tensor, sink_entries: int, start: int, end: int) -> torch.Tensor:
    return torch.cat([states[..., :sink_entries, :], states[..., start:end, :]], dim=-2)

