"""A KV cache that writes every append in place into one allocation per layer (docs/decoding.md).

`DynamicLayer` concatenates on every update: each decode step writes the whole KV again (O(context)
bytes per token) and holds a transient second copy. The engine knows, before a sample's prefill,
how many tokens the prefix has and how many any try can add (the longest suffix + `max_new_tokens`),
so each layer allocates `prefix + reserve` tokens once, as transformers' `StaticLayer` does
(https://huggingface.co/docs/transformers/kv_cache), but keeps the dynamic layer's interface: `keys`
and `values` are views of the filled part, so attention sees exactly the tensors a `DynamicLayer`
would hold and `kv_cache_bytes` counts the tokens held. A layer that outgrows its allocation (a
method that prefills more than the prefix, a suffix beyond the reserve) reallocates to what it needs
plus the reserve, so the cache is never wrong, only slower.

Restoring the prefilled state for the next try (`prefix_restorer`) is a truncation: the prefix's
entries are never overwritten, a try only writes after them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer. `keys`/`values` are views `[B, H, length, D]` of the allocation in `storage`.

    `storage` is a dict, not a tensor attribute: `kv_cache_bytes` counts the tensor attributes, i.e.
    the tokens held; `reserved_bytes()` gives the allocation (at most `reserve` tokens more).
    """

    def __init__(self, capacity: int = 0, reserve: int = 0):
        super().__init__()
        if capacity < 0 or reserve < 0:
            raise ValueError(f"capacity and reserve must be >= 0, got capacity={capacity}, reserve={reserve}")
        self.capacity, self.reserve = capacity, reserve
        self.storage: dict[str, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        self.keys = self._append("keys", key_states, length, needed)
        self.values = self._append("values", value_states, length, needed)
        return self.keys, self.values

    def _append(self, name: str, states: torch.Tensor, length: int, needed: int) -> torch.Tensor:
        buffer = self.storage.get(name)
        if buffer is None or buffer.shape[-2] < needed:
            # First allocation: the planned capacity; after an overflow: what is needed plus the reserve.
            size = max(self.capacity, needed + self.reserve) if buffer is None else needed + self.reserve
            grown = states.new_empty(*states.shape[:-2], size, states.shape[-1])
            if length:
                grown[..., :length, :].copy_(buffer[..., :length, :])
            self.storage[name] = buffer = grown
        buffer[..., length:needed, :].copy_(states)
        return buffer[..., :needed, :]

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (the entries after them are overwritten by the next appends)."""
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(f"cannot truncate a layer of {self.get_seq_length()} tokens to {length}")
        if self.is_initialized:
            self.keys = self.storage["keys"][..., :length, :]
            self.values = self.storage["values"][..., :length, :]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        self.truncate(self.get_seq_length() + tokens_to_remove)

    def reserved_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.storage.values())

    def reset(self) -> None:
        self.storage = {}
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the preallocated cache does not support beam search")

    batch_select_indices = batch_repeat_interleave


class PreallocatedCache(Cache):
    """One `PreallocatedLayer` per layer, each allocating `capacity` tokens at its first update."""

    def __init__(self, num_layers: int, capacity: int = 0, reserve: int = 0):
        super().__init__(layers=[PreallocatedLayer(capacity, reserve) for _ in range(num_layers)])

    def prefix_restorer(self) -> Callable[[], PreallocatedCache]:
        """A callable that truncates every layer back to its length now and returns the cache: O(1)."""
        lengths = [layer.get_seq_length() for layer in self.layers]

        def restore() -> PreallocatedCache:
            for layer, length in zip(self.layers, lengths):
                layer.truncate(length)
            return self

        return restore

    def reserved_bytes(self) -> int:
        return sum(layer.reserved_bytes() for layer in self.layers)


def preallocated_cache(config, prefix_tokens: int, reserve: int):
    """A `PreallocatedCache` for a model of text `config` whose layers all attend fully (the cache
    holds every token); otherwise transformers' `DynamicCache`, whose layer types follow the config."""
    from transformers import DynamicCache

    from duokit.decode_together import full_attention_only

    if not full_attention_only(config):
        return DynamicCache(config=config)
    return PreallocatedCache(config.num_hidden_layers, prefix_tokens + reserve, reserve)
