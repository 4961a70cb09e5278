"""The recurrent memory in the language model's KV cache: a cache layer that can drop tokens, and the
two ways of choosing what a layer keeps (attention mass from the segment's last tokens, or pooling).

A `MemoryLayer` is a `DynamicLayer` (concatenates) whose stored tokens can be reduced after a segment
(`keep` / `pool`). Keys are cached after RoPE, so a kept token keeps the position it was prefilled at;
`get_seq_length` counts every token the layer has seen (like transformers' sliding-window layers), the
number of positions consumed, not the number stored. Every tensor attribute of a layer is KV (the
engine's `kv_cache_bytes` counts them all).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class MemoryLayer(DynamicLayer):
    """One layer's KV: the system prefix, the memory, the current segment (and later the text)."""

    def __init__(self) -> None:
        super().__init__()
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"the llamb cache supports batch size 1 only, got {key_states.shape[0]}")
        self.cumulative_length += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    @property
    def stored(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def keep(self, start: int, indices: torch.Tensor) -> None:
        """Keep tokens [0, start) and, of the tokens from `start` on, those at `indices` (relative, ascending)."""
        index = torch.cat([torch.arange(start, device=self.keys.device), start + indices.to(self.keys.device)])
        self.keys = self.keys.index_select(-2, index)
        self.values = self.values.index_select(-2, index)

    def pool(self, start: int, bins: torch.Tensor) -> None:
        """Replace the tokens from `start` on by the means of their `bins` (bin of each token, from 0,
        non-decreasing): K and V are averaged after RoPE, so a pooled key mixes its members' positions."""
        self.keys = torch.cat([self.keys[..., :start, :], pool_tokens(self.keys[..., start:, :], bins)], dim=-2)
        self.values = torch.cat([self.values[..., :start, :], pool_tokens(self.values[..., start:, :], bins)], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if -tokens_to_remove > self.stored:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens from a layer holding {self.stored}")
        super().crop(tokens_to_remove)
        self.cumulative_length += tokens_to_remove

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the llamb cache supports batch size 1 only (no beam search)")

    batch_repeat_interleave = batch_select_indices = reorder_cache


class MemoryCache(Cache):
    """One `MemoryLayer` per language-model layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[MemoryLayer() for _ in range(num_layers)])


def pool_tokens(states: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Mean of `states` [B, H, n, D] over the tokens of each bin along dim -2."""
    count = int(bins[-1]) + 1
    bins = bins.to(states.device)
    sums = states.new_zeros(*states.shape[:-2], count, states.shape[-1]).index_add_(-2, bins, states)
    return sums / torch.bincount(bins, minlength=count).to(states.dtype)[:, None]


def pool_bins(tokens: int, memory: int) -> torch.Tensor:
    """The bin of each of `tokens` candidates when pooled into `memory` contiguous, nearly equal bins."""
    return torch.arange(tokens) * memory // tokens


def top_by_mass(mass: torch.Tensor, memory: int) -> torch.Tensor:
    """Indices (ascending) of the `memory` candidates with the largest attention mass; equal mass
    prefers the earlier token."""
    order = torch.sort(mass, descending=True, stable=True).indices
    return order[:memory].sort().values


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention weight each key receives from the last `q` query rows, summed over rows and
    query heads: query [1, H_q, q, D] (the last q tokens of the layer's keys), keys [1, H_kv, kv, D].
    Causal: row i of the q sees keys up to kv − q + i. Float32; O(q·kv) memory, no kv × kv matrix."""
    rows, length = query.shape[-2], keys.shape[-2]
    groups = query.shape[1] // keys.shape[1]
    expanded = keys.float().repeat_interleave(groups, dim=1)
    scores = query.float() @ expanded.transpose(-1, -2) * scaling
    hidden = torch.ones(rows, length, dtype=torch.bool, device=query.device).triu(length - rows + 1)
    weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return weights.sum(dim=(0, 1, 2))
