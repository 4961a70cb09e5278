"""The selection pass: the question rows' attention at one decoder layer, without `output_attentions`.

FlexAttention reads the selected rows of layer l's softmax(QKᵀ/√d) over the image columns. Here an
attention function (transformers' `AttentionInterface`, selected for the language model for this pass
only) gets each layer's post-RoPE queries and the cache's keys; at the selection layer it computes
softmax rows only for the query rows at or after `rows_from` (the question, which follows the video),
summed over heads, and keeps their video columns: O(rows × keys) memory, never an N × N matrix. The
pass runs layers 0 … l over the prefix in chunks into a throw-away cache and stops there (a forward
pre-hook on layer l + 1 raises), so it costs about (l + 1)/L of a prefill.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import DynamicCache

from duokit.methods.attention import causal_attention, select_attention

PROBE_ATTENTION = "duokit_flex_probe"


class _Stop(Exception):
    """Raised by the hook on the layer after the selection layer: the pass has what it needs."""


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float | None, rows_from: int,
                   columns: torch.Tensor) -> torch.Tensor:
    """`(r, len(columns))` float32: Σ_heads softmax(q·Kᵀ·scaling) (causal) of this chunk's query rows whose
    absolute index is >= `rows_from`, at the key indices `columns`. query `[1, Hq, q, D]`, key
    `[1, Hkv, kv, D]` (the chunk's queries are the last q of the kv positions)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    start = kv_len - q_len
    first = max(rows_from - start, 0)
    if first >= q_len:
        return query.new_zeros(0, len(columns), dtype=torch.float32)
    heads = query.shape[1]
    q = query[0, :, first:].float()
    k = key[0].float().repeat_interleave(heads // key.shape[1], dim=0)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q @ k.transpose(-1, -2) * scale  # (Hq, r, kv)
    rows = start + first + torch.arange(q.shape[1], device=q.device)
    scores = scores.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > rows[:, None], float("-inf"))
    return scores.softmax(-1).sum(0)[:, columns]


@torch.no_grad()
def question_attention(lm: Any, prefix: Any, layer: int, rows_from: int, chunk_size: int) -> torch.Tensor:
    """`(R, V)` float32: the head-summed attention at decoder `layer` of prefix rows `rows_from` … L − 1
    over the prefix's V video tokens (in order)."""
    adapter = lm.adapter
    columns = prefix.video_mask.nonzero()[:, 0]
    collected: list[torch.Tensor] = []

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx == layer:
            collected.append(attention_rows(query, key, scaling, rows_from, columns))
        return causal_attention(module, query, key, value, attention_mask, scaling, dropout)

    def stop(module, args, kwargs):
        raise _Stop

    layers = adapter.decoder_layers
    cache = DynamicCache(config=adapter.text_config)
    with contextlib.ExitStack() as stack:
        stack.enter_context(select_attention(lm.model, PROBE_ATTENTION, attention,
                                             modules=[decoder.self_attn for decoder in layers]))
        if layer + 1 < len(layers):
            handle = layers[layer + 1].register_forward_pre_hook(stop, with_kwargs=True)
            stack.callback(handle.remove)
        length = prefix.num_tokens
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            try:
                adapter.language_model(inputs_embeds=prefix.inputs_embeds[:, start:end],
                                       position_ids=prefix.position_ids[..., start:end], past_key_values=cache,
                                       use_cache=True, **adapter.chunk_inputs(prefix, start, end))
            except _Stop:
                pass
    return torch.cat(collected) if collected else torch.zeros(0, len(columns))
