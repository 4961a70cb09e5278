"""A KV cache that stores retrieval and streaming KV heads separately (docs/duoattention.md).

Retrieval heads keep every token; streaming heads keep the first `sink` tokens and the `recent`
most recent ones, so their memory is really never allocated beyond sink + recent + 1. The recipe is the
per-head layer of transformers' `Cache` / `CacheLayerMixin` API: `update` returns a `SplitKV` (not a
tensor), which the model hands unchanged to the `duokit_duo` attention function.

Both parts are allocated once per sample and written in place. The retrieval heads append into one
allocation (`duokit.methods.preallocated`). The streaming heads hold a fixed buffer of sink + recent + 1
slots (`HeadPlan.window`): the sink tokens at their positions, then a ring of recent + 1 slots in which
token p (p >= sink) sits at slot `sink + (p - sink) mod (recent + 1)` (`HeadPlan.slot`). A decode step
writes its token over the one its query no longer sees, so the whole buffer is exactly that query's
window: one mask-free attention call, no copy. Once the ring has wrapped, its entries are a rotation of
position order; softmax attention does not depend on the order of its keys, only the float summation
order changes (the tests compare with an independent dense reference). A chunk of several tokens that
does not fit the unwrapped buffer attends to a position-ordered copy of the window + the chunk, as
before (O(window + chunk) per chunk, not per token).

`DuoCache.prefix_restorer` gives each try the prefilled state back: retrieval heads by truncation,
streaming heads by writing back the prefix's ring slots that a try of up to `reserve` tokens can
overwrite, saved once after the prefill (`restore_slots`: O(suffix) time and memory).
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

    @property
    def window(self) -> int:
        """Slots of a streaming head's buffer: the sink, the `recent` tokens a query sees, and the query."""
        return self.sink + self.recent + 1

    def slot(self, position: int) -> int:
        """Where a streaming head's buffer keeps the token at `position` (a ring after the sink)."""
        return position if position < self.sink else self.sink + (position - self.sink) % (self.recent + 1)


def restore_slots(plan: HeadPlan, prefix_length: int, reserve: int) -> tuple[list[int], int | None]:
    """The streaming buffer's slots holding prefix tokens that a try of up to `reserve` tokens (0: of any
    length) after a prefix of `prefix_length` tokens overwrites, and the length up to which a try may
    grow with only those saved (None: any). Until the ring wraps a try writes only empty slots; after,
    at most recent + 1 distinct slots, so the saved entries are O(min(suffix, window))."""
    filled, ring = min(prefix_length, plan.window), plan.recent + 1
    first = max(prefix_length, plan.window)  # the first position of the try that wraps onto the prefix
    unbounded = not reserve or prefix_length + reserve >= first + ring
    last = first + ring if unbounded else prefix_length + reserve
    slots = sorted({plan.slot(position) for position in range(first, last)} & set(range(plan.sink, filled)))
    return slots, None if unbounded else prefix_length + reserve


@dataclass(frozen=True)
class SplitKV:
    """Keys (or values) of one layer for the current step, the two head groups apart.

    `streaming` holds the cached sink + recent tokens followed by this step's tokens. Entry `i` of
    it is the token at position `i` if `i < sink`, else at position `i + streaming_offset`; except for
    a single query (decode) on a wrapped ring, whose entries are the same tokens in ring order (the
    query sees all of them, so the order does not matter).
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
    `streaming_keys`/`streaming_values` the filled slots of the streaming heads' fixed buffer (at most
    sink + recent + 1 tokens, in `storage` beside the retrieval allocation). GQA is per KV head.
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
        past_length, q_len = self.cumulative_length, key_states.shape[-2]
        self.cumulative_length += q_len
        retrieval, streaming = self.plan.retrieval_heads, self.plan.streaming_heads
        self.keys = self._append("keys", select_heads(key_states, retrieval), past_length, self.cumulative_length)
        self.values = self._append("values", select_heads(value_states, retrieval), past_length,
                                   self.cumulative_length)
        new_keys, new_values = select_heads(key_states, streaming), select_heads(value_states, streaming)
        # The entries the first query sees besides the chunk: the sink + the last `recent` tokens.
        offset = past_length - min(past_length, self.plan.sink + self.plan.recent)
        if q_len == 1 or self.cumulative_length <= self.plan.window:
            # The buffer after the write is this step's window (position order until the ring wraps).
            self._write(new_keys, new_values, past_length)
            streaming_keys, streaming_values = self.streaming_keys, self.streaming_values
        else:  # several queries with different windows: a position-ordered copy, then the write
            streaming_keys = torch.cat([*self._ordered("streaming_keys", past_length), new_keys], dim=-2)
            streaming_values = torch.cat([*self._ordered("streaming_values", past_length), new_values], dim=-2)
            self._write(new_keys, new_values, past_length)
        return (SplitKV(self.keys, streaming_keys, self.plan, past_length, offset),
                SplitKV(self.values, streaming_values, self.plan, past_length, offset))

    def _write(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """Write the tokens at positions first, first + 1, ... into their slots (those a later token of
        the same chunk overwrites are skipped) and expose the filled slots."""
        filled = min(self.cumulative_length, self.plan.window)
        for name, states in (("streaming_keys", keys), ("streaming_values", values)):
            buffer = self._streaming_buffer(name, states, first, filled)
            for position, stop in self._runs(first, first + states.shape[-2]):
                slot = self.plan.slot(position)
                run = min(stop - position, self.plan.window - slot)
                buffer[..., slot:slot + run, :].copy_(states[..., position - first:position - first + run, :])
                if run < stop - position:  # the run wraps around the ring's end
                    buffer[..., self.plan.sink:self.plan.sink + stop - position - run, :].copy_(
                        states[..., position - first + run:stop - first, :])
            setattr(self, name, buffer[..., :filled, :])

    def _runs(self, first: int, stop: int) -> list[tuple[int, int]]:
        """Position ranges of a chunk [first, stop) that stay in the buffer: below the sink, and the last
        recent + 1 tokens after it."""
        sink, ring = self.plan.sink, self.plan.recent + 1
        runs = [(first, min(stop, sink)), (max(first, sink, stop - ring), stop)]
        return [(start, end) for start, end in runs if start < end]

    def _streaming_buffer(self, name: str, states: torch.Tensor, first: int, filled: int) -> torch.Tensor:
        """The fixed buffer: `window` slots, or fewer when the planned capacity is smaller (a short
        sample); grown only if a sample outgrows its capacity, which happens before the ring wraps."""
        buffer = self.storage.get(name)
        if buffer is None or buffer.shape[-2] < filled:
            window = self.plan.window
            size = min(window, self.capacity or window) if buffer is None else min(window, filled + self.reserve)
            grown = states.new_empty(*states.shape[:-2], max(size, filled), states.shape[-1])
            if first:
                grown[..., :first, :].copy_(buffer[..., :first, :])
            self.storage[name] = buffer = grown
        return buffer

    def _ordered(self, name: str, length: int) -> list[torch.Tensor]:
        """Views of the entries the next query after `length` tokens sees (the sink + the last `recent`
        tokens), in position order."""
        buffer, sink, recent = self.storage.get(name), self.plan.sink, self.plan.recent
        if length <= sink + recent:
            return [] if buffer is None else [buffer[..., :length, :]]
        start = self.plan.slot(length - recent)
        tail = min(recent, self.plan.window - start)
        return [buffer[..., :sink, :], buffer[..., start:start + tail, :],
                buffer[..., sink:sink + recent - tail, :]]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        self.streaming_keys = self.streaming_values = None
        self.cumulative_length = 0
        super().reset()

    def save_prefix(self) -> PrefixState:
        """The state after the tokens so far, with the streaming entries a try of `reserve` tokens overwrites."""
        slots, limit = restore_slots(self.plan, self.cumulative_length, self.reserve)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        saved = tuple(self.storage[name].index_select(-2, index) if slots else None
                      for name in ("streaming_keys", "streaming_values"))
        return PrefixState(self.cumulative_length, limit, index, *saved)

    def restore(self, state: PrefixState) -> None:
        """Back to `state`: the retrieval heads by truncation, the streaming heads by writing back the saved slots."""
        if state.limit is not None and self.cumulative_length > state.limit:
            raise RuntimeError(f"a try grew the DuoAttention cache to {self.cumulative_length} tokens, beyond the "
                               f"{state.limit} its prefix's streaming window was saved for; give the cache a "
                               "larger reserve (lm.decode_reserve = longest suffix + max_new_tokens)")
        self.truncate(state.length)
        self.cumulative_length = state.length
        filled = min(state.length, self.plan.window)
        for name, saved in (("streaming_keys", state.keys), ("streaming_values", state.values)):
            buffer = self.storage[name]
            if saved is not None:
                buffer.index_copy_(-2, state.index, saved)
            setattr(self, name, buffer[..., :filled, :])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the DuoAttention cache cannot be cropped: evicted streaming tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the DuoAttention cache supports batch size 1 only (no beam search)")

    batch_repeat_interleave = batch_select_indices = reorder_cache


@dataclass(frozen=True)
class PrefixState:
    """A layer's state after the prefix: its length, the length a try may reach (None: any), and the
    streaming slots (`index`) a try overwrites with their saved keys and values (None: none)."""

    length: int
    limit: int | None
    index: torch.Tensor
    keys: torch.Tensor | None
    values: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(saved.nbytes for saved in (self.keys, self.values) if saved is not None)


class PrefixRestorer:
    """Called once per try: puts every layer back to its prefilled state and returns the cache."""

    def __init__(self, cache: DuoCache):
        self.cache = cache
        self.states = [layer.save_prefix() if layer.is_initialized else None for layer in cache.layers]

    def __call__(self) -> DuoCache:
        for layer, state in zip(self.cache.layers, self.states):
            if state is not None:
                layer.restore(state)
        return self.cache

    @property
    def nbytes(self) -> int:
        """KV bytes saved to restore the prefix (`Duo.estimate_restore_kv_bytes`)."""
        return sum(state.nbytes for state in self.states if state is not None)


class DuoCache(Cache):
    """One `DuoLayer` per language-model layer, laid out by its `HeadPlan`; the retrieval heads of
    each allocate `capacity` tokens at their first update (see `PreallocatedLayer`), the streaming heads
    min(capacity, sink + recent + 1) slots."""

    def __init__(self, plans: Sequence[HeadPlan], capacity: int = 0, reserve: int = 0):
        super().__init__(layers=[DuoLayer(plan, capacity, reserve) for plan in plans])

    def prefix_restorer(self) -> Callable[[], DuoCache]:
        """A callable that puts every layer back to its state now and returns the cache. It saves the
        streaming slots a try of `reserve` tokens overwrites (`restore_slots`, counted by
        `duo_restore_kv_bytes`) and writes them back on each call: O(suffix)."""
        return PrefixRestorer(self)

    def reserved_bytes(self) -> int:
        """The allocations (retrieval and streaming heads), as `PreallocatedCache.reserved_bytes`."""
        return sum(layer.reserved_bytes() for layer in self.layers)


def duo_kv_bytes(plans: Sequence[HeadPlan], head_dim: int, num_tokens: int, dtype_bytes: int,
                 batch_size: int = 1) -> int:
    """Exact bytes a `DuoCache` holds after `num_tokens` tokens (docs/duoattention.md, "KV memory"):
    2·D·b·B·Σ_layers(n_retrieval·T + n_streaming·min(T, sink + recent + 1)). With T = prefix + reserve
    it is also the cache's allocation."""
    heads_x_tokens = sum(len(plan.retrieval_heads) * num_tokens
                         + len(plan.streaming_heads) * min(num_tokens, plan.window) for plan in plans)
    return 2 * head_dim * dtype_bytes * batch_size * heads_x_tokens


def duo_restore_kv_bytes(plans: Sequence[HeadPlan], head_dim: int, prefix_tokens: int, reserve: int,
                         dtype_bytes: int) -> int:
    """Exact bytes `DuoCache.prefix_restorer` saves: the streaming slots of `restore_slots`."""
    heads_x_tokens = sum(len(plan.streaming_heads) * len(restore_slots(plan, prefix_tokens, reserve)[0])
                         for plan in plans)
    return 2 * head_dim * dtype_bytes * heads_x_tokens
