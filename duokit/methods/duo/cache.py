"""A KV cache that stores retrieval and streaming KV heads separately (docs/duoattention.md).

Retrieval heads keep every token; streaming heads keep the first `sink` tokens and the `recent`
most recent ones, so their memory is really never allocated beyond sink + recent. The recipe is the
per-head layer of transformers' `Cache` / `CacheLayerMixin` API: `update` returns a `SplitKV` (not a tensor), which the model
hands unchanged to the `duokit_duo` attention function; eviction happens after the current step.
The retrieval heads append in place into one allocation (`duokit.methods.preallocated`); the streaming
heads' few entries are rebuilt per step. `DuoCache.prefix_restorer` gives each try the prefilled state
back: retrieval heads by truncation, streaming heads from the prefilled window, which it keeps (no
step writes into an existing streaming tensor), so a try never evicts what the next one needs.
Batch size 1 only: no padding masks, no beam search, no cropping.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from duokit.methods.preallocated import PreallocatedLayer


@dataclass(frozen=True)
class HeadPlan:
    """The head layout of one layer: which KV heads are retrieval / streaming heads, and the streaming
    window (the `sink` first tokens, the `recent` tokens before the query, the query itself)."""

    retrieval_heads: tuple[int, ...]
    streaming_heads: tuple[int, ...]
    sink: int
    recent: int
    full_first_chunk: bool = False
    # An all-retrieval layer runs transformers' own sdpa call (bit-identical to the baseline); with
    # exact=False it runs the kernels of a mixed layer (packed decode, mask-free CPU flash prefill):
    # the dense baseline with duo's own kernels that benchmarks/duo_speed.py compares against.
    exact: bool = True

    def __post_init__(self) -> None:
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"sink and recent must be >= 0, got sink={self.sink}, recent={self.recent}")

    @classmethod
    def from_row(cls, retrieval: Sequence[bool], sink: int, recent: int, full_first_chunk: bool = False) -> HeadPlan:
        """From one layer's row of the retrieval matrix (True = retrieval KV head)."""
        return cls(tuple(i for i, keep in enumerate(retrieval) if keep),
                   tuple(i for i, keep in enumerate(retrieval) if not keep), int(sink), int(recent),
                   bool(full_first_chunk))

    @property
    def num_kv_heads(self) -> int:
        return len(self.retrieval_heads) + len(self.streaming_heads)


@dataclass(frozen=True)
class SplitKV:
    """Keys (or values) of one layer for the current step, the two head groups apart.

    `streaming` holds the cached sink + recent tokens followed by this step's tokens. Entry `i` of
    it is the token at position `i` if `i < sink`, else at position `i + streaming_offset`.
    """

    retrieval: torch.Tensor  # [B, len(retrieval_heads), past_length + q_len, D]
    streaming: torch.Tensor  # [B, len(streaming_heads), cached + q_len, D]
    plan: HeadPlan
    past_length: int
    streaming_offset: int


def select_heads(states: torch.Tensor, heads: tuple[int, ...], dim: int = 1) -> torch.Tensor:
    """`states` restricted to `heads` along `dim`, as a view when the heads are a contiguous run."""
    if heads and heads == tuple(range(heads[0], heads[-1] + 1)):
        return states.narrow(dim, heads[0], len(heads))
    return states.index_select(dim, head_index(heads, states.device))


@functools.lru_cache(maxsize=1024)
def head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Index tensors are cached here, not on the cache layers, whose tensors are all KV (kv_cache_bytes)."""
    return torch.tensor(heads, dtype=torch.long, device=device)


class DuoLayer(PreallocatedLayer):
    """One layer: `keys`/`values` hold the retrieval heads (all tokens, preallocated for `capacity`),
    `streaming_keys`/`streaming_values` the streaming heads (at most sink + recent tokens). GQA is per KV head.
    """

    is_croppable = False

    def __init__(self, plan: HeadPlan, capacity: int = 0, reserve: int = 0):
        super().__init__(capacity, reserve)
        self.plan = plan
        self.streaming_keys: torch.Tensor | None = None
        self.streaming_values: torch.Tensor | None = None
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != self.plan.num_kv_heads:
            raise ValueError(f"DuoLayer expects {self.plan.num_kv_heads} KV heads, got keys of shape {tuple(key_states.shape)}")
        if key_states.shape[0] != 1:
            raise ValueError(f"the DuoAttention cache supports batch size 1 only, got {key_states.shape[0]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        retrieval, streaming = self.plan.retrieval_heads, self.plan.streaming_heads
        empty = key_states[:, :, :0]
        self.keys, self.streaming_keys = select_heads(empty, retrieval), select_heads(empty, streaming)
        empty = value_states[:, :, :0]
        self.values, self.streaming_values = select_heads(empty, retrieval), select_heads(empty, streaming)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[SplitKV, SplitKV]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_length = self.cumulative_length
        # Positions of the cached streaming entries: contiguous until the first eviction, then sink + tail.
        cached = self.streaming_keys.shape[-2]
        offset = past_length - cached
        self.cumulative_length += key_states.shape[-2]
        retrieval, streaming = self.plan.retrieval_heads, self.plan.streaming_heads
        self.keys = self._append("keys", select_heads(key_states, retrieval), past_length, self.cumulative_length)
        self.values = self._append("values", select_heads(value_states, retrieval), past_length,
                                   self.cumulative_length)
        streaming_keys = torch.cat([self.streaming_keys, select_heads(key_states, streaming)], dim=-2)
        streaming_values = torch.cat([self.streaming_values, select_heads(value_states, streaming)], dim=-2)
        split = (SplitKV(self.keys, streaming_keys, self.plan, past_length, offset),
                 SplitKV(self.values, streaming_values, self.plan, past_length, offset))
        # Evict after this step: the current chunk still attends to its own tokens.
        self.streaming_keys, self.streaming_values = self._evict(streaming_keys), self._evict(streaming_values)
        return split

    def _evict(self, states: torch.Tensor) -> torch.Tensor:
        length, sink, recent = states.shape[-2], self.plan.sink, self.plan.recent
        if length <= sink + recent:
            return states
        return torch.cat([states[..., :sink, :], states[..., length - recent:, :]], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        self.streaming_keys = self.streaming_values = None
        super().reset()

    def restore(self, length: int, streaming_keys: torch.Tensor, streaming_values: torch.Tensor) -> None:
        """Back to the state after `length` tokens, whose streaming entries were the given tensors."""
        self.truncate(length)
        self.cumulative_length = length
        self.streaming_keys, self.streaming_values = streaming_keys, streaming_values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the DuoAttention cache cannot be cropped: evicted streaming tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the DuoAttention cache supports batch size 1 only (no beam search)")

    batch_repeat_interleave = batch_select_indices = reorder_cache


class DuoCache(Cache):
    """One `DuoLayer` per language-model layer, laid out by its `HeadPlan`; the retrieval heads of
    each allocate `capacity` tokens at their first update (see `PreallocatedLayer`)."""

    def __init__(self, plans: Sequence[HeadPlan], capacity: int = 0, reserve: int = 0):
        super().__init__(layers=[DuoLayer(plan, capacity, reserve) for plan in plans])

    def prefix_restorer(self) -> Callable[[], DuoCache]:
        """A callable that puts every layer back to its state now and returns the cache. It keeps the
        streaming tensors of now (at most sink + recent tokens per streaming head, the slack
        `duo_kv_bytes(..., streaming_only=True)` counts); nothing is copied."""
        states = [(layer.cumulative_length, layer.streaming_keys, layer.streaming_values) for layer in self.layers]

        def restore() -> DuoCache:
            for layer, state in zip(self.layers, states):
                if layer.is_initialized:
                    layer.restore(*state)
            return self

        return restore


def duo_kv_bytes(plans: Sequence[HeadPlan], head_dim: int, num_tokens: int, dtype_bytes: int,
                 batch_size: int = 1, streaming_only: bool = False) -> int:
    """Exact bytes a `DuoCache` holds after `num_tokens` tokens (docs/duoattention.md, "KV memory"):
    2·D·b·B·Σ_layers(n_retrieval·T + n_streaming·min(T, sink + recent)); the streaming term alone with
    `streaming_only`."""
    heads_x_tokens = sum(len(plan.retrieval_heads) * num_tokens * (not streaming_only)
                         + len(plan.streaming_heads) * min(num_tokens, plan.sink + plan.recent) for plan in plans)
    return 2 * head_dim * dtype_bytes * batch_size * heads_x_tokens
