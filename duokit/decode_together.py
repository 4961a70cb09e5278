"""The tries of one prefix decoded together: one batch, the shared prefix KV read once per step.

VNBench asks each question four times, the options in four orders (docs/scoring.md); the tries share
the whole prefix (system turn + video) and differ only in their short suffix. Decoded one after the
other, each step of each try reads the model weights and the whole prefix KV: 4 × (suffix step +
new tokens) reads of both. Decoded together, the batch of tries reads the weights once per step, and
its attention reads the prefix KV once per step for all of them: the queries of every try are packed
as rows against the one prefix K/V per KV head (as packed GQA packs the query heads of a KV head,
transformers' `pack_gqa` layout), and each try's own suffix KV is attended apart (a small masked call);
the two parts are merged by their log-sum-exp (`duokit.methods.attention.merge_by_lse`; the softmax
over the union of two disjoint key sets). The prefilled cache is only read: nothing of the prefix is
copied, and each try adds its suffix + new tokens in one small buffer.

The suffixes are right-padded to the longest; a padded slot is never a key (`valid`), and each try
reads its logits at its own last suffix token and continues at its own positions. A try that ended
(EOS) keeps running in the batch, unrecorded, until every try has ended. Tokens equal sequential
greedy decoding (tests/test_decode_together.py); logits agree up to float rounding (another order
of summation), so the engine's exact-logits mode (`keep_logits`) decodes the tries one by one.

Limits: full-attention layers whose cache layers expose `keys`/`values` for every KV head (the
baseline's cache); no sliding-window layers, no per-head caches (DuoAttention's streaming heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from duokit.methods.attention import flash_cpu, select_attention

ATTENTION_NAME = "duokit_tries"


@dataclass(frozen=True)
class TriesKV:
    """Keys (or values) of one layer for this step: the shared prefix and every try's suffix slots."""

    prefix: torch.Tensor  # [1, H_kv, P, D], the prefilled cache's own tensor (read only)
    suffix: torch.Tensor  # [B, H_kv, L, D], slots 0..L-1 (this step's among them, last)
    valid: torch.Tensor  # [B, L] bool: slot holds a real token of that try (not padding)


class TriesLayer(CacheLayerMixin):
    """One layer: a view of the prefilled layer's KV plus a `[B, H_kv, capacity, D]` suffix buffer per
    K and V, written in place."""

    is_compileable = is_sliding = False

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, valid: torch.Tensor, capacity: int):
        super().__init__()
        batch = valid.shape[0]
        self.keys, self.values = prefix_keys, prefix_values
        shape = (batch, prefix_keys.shape[1], capacity, prefix_keys.shape[-1])
        self.suffix_keys = prefix_keys.new_empty(shape)
        self.suffix_values = prefix_values.new_empty(shape)
        # Shared by every layer and set by the decode loop; in a dict because it is not KV
        # (`kv_cache_bytes` counts the tensor attributes of a layer).
        self.slots = {"valid": valid}
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # built initialized
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[TriesKV, TriesKV]:
        end = self.length + key_states.shape[-2]
        self.suffix_keys[:, :, self.length:end].copy_(key_states)
        self.suffix_values[:, :, self.length:end].copy_(value_states)
        self.length = end
        valid = self.slots["valid"][:, :end]
        return (TriesKV(self.keys, self.suffix_keys[:, :, :end], valid),
                TriesKV(self.values, self.suffix_values[:, :, :end], valid))

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


def tries_attention(module: torch.nn.Module, query: torch.Tensor, key: TriesKV, value: TriesKV,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query `[B, H_q, q, D]` (the tries' q newest slots) over the
    shared prefix (every query sees all of it) and its try's valid suffix slots up to its own;
    returns `[B, q, H_q, D]`."""
    if not isinstance(key, TriesKV):
        raise TypeError(f"{ATTENTION_NAME} attention runs only with the cache of decode_tries_together")
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads = key.prefix.shape[1]
    groups = num_heads // kv_heads
    scale = 1 / math.sqrt(head_dim) if scaling is None else scaling
    # [B, H_kv, groups, q, D]: the query heads of KV head h are h·groups … (transformers' repeat_kv order).
    grouped = query.reshape(batch, kv_heads, groups, q_len, head_dim)
    # Prefix: every try's queries as rows of one call per KV head, each prefix entry read once.
    packed = grouped.permute(1, 0, 2, 3, 4).reshape(1, kv_heads, batch * groups * q_len, head_dim)
    prefix_out, prefix_lse = _attend(packed, key.prefix, value.prefix, scale, None)
    prefix_out = prefix_out.reshape(kv_heads, batch, groups, q_len, head_dim).transpose(0, 1)
    prefix_lse = prefix_lse.reshape(kv_heads, batch, groups, q_len).transpose(0, 1)
    # Suffix: each try's own slots, causal among the slots, padding never a key.
    length = key.suffix.shape[-2]
    slots = torch.arange(length, device=query.device)
    causal = slots[None, :] <= slots[length - q_len:, None]  # [q, L]
    mask = causal[None] & key.valid[:, None, :]  # [B, q, L]
    mask = mask[:, None, None].expand(batch, kv_heads, groups, q_len, length).reshape(batch, kv_heads, -1, length)
    suffix_out, suffix_lse = _attend(grouped.reshape(batch, kv_heads, groups * q_len, head_dim), key.suffix,
                                     value.suffix, scale, mask)
    suffix_out = suffix_out.reshape(batch, kv_heads, groups, q_len, head_dim)
    suffix_lse = suffix_lse.reshape(batch, kv_heads, groups, q_len)
    lse = torch.logaddexp(prefix_lse, suffix_lse)
    output = (prefix_out * (prefix_lse - lse).exp()[..., None] + suffix_out * (suffix_lse - lse).exp()[..., None])
    return output.permute(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).to(query.dtype), None


def _attend(query, key, value, scale, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(output float32 `[B, H, M, D]`, log-sum-exp `[B, H, M]`) of softmax attention; `mask` [B, H, M, N]."""
    if mask is None and query.device.type == "cpu":
        return flash_cpu(query, key, value, False, scale)  # mask-free CPU flash kernel, which gives the lse
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ value.float(), lse


def full_attention_only(config: Any) -> bool:
    """Whether every layer of the text model of `config` attends to all tokens (a sliding-window layer's
    cache keeps only a window: the batch cannot read the prefix from it)."""
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def together_kv_tokens(suffixes: Sequence[torch.Tensor], max_new_tokens: int) -> int:
    """Tokens the batch holds beside the prefix: per try, the longest suffix + every new token but the
    last (never fed back), allocated up front."""
    return len(suffixes) * (max(suffix.shape[1] for suffix in suffixes) + max_new_tokens - 1)


def _positions(adapter: Any, starts: Sequence[int], count: int) -> torch.Tensor:
    """Position ids of `count` tokens for each try, the batch stacked on the tokens' batch axis."""
    return torch.cat([adapter.positions(start, count) for start in starts], dim=-2)


@torch.no_grad()
def decode_tries_together(lm: Any, cache: Cache, prefix: Any, suffixes: Sequence[torch.Tensor],
                          max_new_tokens: int, logits: list[list[torch.Tensor]] | None = None) -> list[list[int]]:
    """Greedy answers of every try (suffix ids `(1, n_i)`) after the prefix prefilled in `cache`, decoded
    as one batch; `cache` is read, not changed. Each try's step logits go to `logits[i]` when given.
    Must run inside the method's `apply` (it selects its attention function for the block)."""
    from duokit.engine import NonFiniteLogits

    batch, longest = len(suffixes), max(suffix.shape[1] for suffix in suffixes)
    device = suffixes[0].device
    capacity = together_kv_tokens(suffixes, max_new_tokens) // batch
    valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)  # padding: any id, never a key
    for index, suffix in enumerate(suffixes):
        ids[index, :suffix.shape[1]] = suffix[0]
        valid[index, :suffix.shape[1]] = True
    layers = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not isinstance(layer.keys, torch.Tensor):
            raise ValueError("decode_tries_together needs full-attention cache layers holding every KV head")
        layers.append(TriesLayer(layer.keys, layer.values, valid, capacity))
    batch_cache = Cache(layers=layers)
    eos = lm.adapter.eos_token_ids
    answers: list[list[int]] = [[] for _ in suffixes]
    done = [False] * batch
    starts = [prefix.next_position] * batch
    last = [suffix.shape[1] - 1 for suffix in suffixes]  # the row whose logits are each try's next token
    with select_attention(lm.model, ATTENTION_NAME, tries_attention):
        for step in range(max_new_tokens):
            count = ids.shape[1]
            hidden = lm.forward(batch_cache, _positions(lm.adapter, starts, count), input_ids=ids)
            rows = hidden[torch.arange(batch, device=device), torch.tensor(last, device=device)]
            step_logits = lm.adapter.lm_head(rows).float()
            if not torch.isfinite(step_logits[[i for i in range(batch) if not done[i]]]).all():
                raise NonFiniteLogits(f"NaN/inf logits at decoding step {step + 1} of a {hidden.dtype} model; "
                                      "run in bfloat16 or float32 (--dtype)")
            tokens = step_logits.argmax(-1).tolist()
            for index, token in enumerate(tokens):
                if done[index]:
                    continue
                answers[index].append(token)
                if logits is not None:
                    logits[index].append(step_logits[index])
                done[index] = token in eos
            if all(done) or step == max_new_tokens - 1:
                break
            starts = [start + (last_row + 1) for start, last_row in zip(starts, last)]
            slot = layers[0].length
            valid[:, slot] = True
            ids = torch.tensor(tokens, device=device)[:, None]
            last = [0] * batch
    return answers
