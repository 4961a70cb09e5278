"""`duo`: DuoAttention inference — retrieval heads keep the full KV cache, streaming heads sink + recent."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from duokit.methods.attention import select_attention
from duokit.methods.base import Method, causal_pairs, register_method, score_flops
from duokit.methods.duo.attention import ATTENTION_NAME, PLAN_ATTRIBUTE, duo_attention
from duokit.methods.duo.cache import DuoCache, HeadPlan, duo_kv_bytes, duo_restore_kv_bytes
from duokit.methods.duo.pattern import Pattern, binarize, load_pattern, save_pattern


@register_method
@dataclass
class Duo(Method):
    """Settings: `pattern` (official pattern directory), `sparsity` (fraction of streaming KV heads,
    global quantile rule), `sink`/`recent` (deploy sizes, the paper's 64/256: a streaming head keeps the
    first `sink` tokens and the `recent` tokens before the query), `per_layer` (the quantile within each
    layer instead of globally), `full_first_chunk` (the official code's full attention on every head
    for the first prefill chunk), `random_heads` (a seed: rank the heads by seeded random gates instead of
    the trained ones, same count per sparsity — the random-heads control of docs/ablate.md); docs/duoattention.md."""

    name = "duo"
    derived_settings = ("pattern_sha256",)
    pattern: str | None = None
    sparsity: float = 0.5
    sink: int = 64
    recent: int = 256
    per_layer: bool = False
    full_first_chunk: bool = False
    random_heads: int | None = None

    def __post_init__(self) -> None:
        if self.pattern is None:
            raise ValueError("the duo method needs a pattern directory (pattern=DIR / --pattern DIR)")
        self.pattern = str(self.pattern)
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"sink and recent must be >= 0, got sink={self.sink}, recent={self.recent}")
        # Fail before any model is loaded: a bad sparsity or pattern directory is one clear error.
        binarize(np.zeros((1, 1)), self.sparsity)
        self.loaded_pattern  # noqa: B018 (reads and validates the pattern files)

    @cached_property
    def loaded_pattern(self) -> Pattern:
        return load_pattern(self.pattern)

    def settings(self) -> dict[str, Any]:
        # The gates, not only the directory name, decide the predictions: a resumed run must read the same ones.
        gates = np.ascontiguousarray(self.loaded_pattern.gates)
        return {**super().settings(), "pattern_sha256": hashlib.sha256(gates.tobytes()).hexdigest()}

    @cached_property
    def retrieval(self) -> np.ndarray:
        """Boolean [layers, KV heads] matrix: True = retrieval head."""
        gates = self.loaded_pattern.gates
        if self.random_heads is not None:  # the control: as many retrieval heads, chosen at random
            gates = np.random.default_rng(self.random_heads).random(np.shape(gates))
        return binarize(gates, self.sparsity, per_layer=self.per_layer)[0]

    def head_plans(self, num_layers: int, num_kv_heads: int) -> tuple[HeadPlan, ...]:
        """One `HeadPlan` per layer, after checking that the pattern has the model's shape."""
        self.loaded_pattern.check_shape(num_layers, num_kv_heads)
        return tuple(HeadPlan.from_row(row.tolist(), self.sink, self.recent, self.full_first_chunk)
                     for row in self.retrieval)

    def install(self, model: Any, adapter: Any) -> contextlib.AbstractContextManager:
        plans = self.head_plans(adapter.num_layers, adapter.num_kv_heads)
        # Language model only: the vision tower keeps its own attention. The plan reaches the attention
        # function through its module when it gets plain tensors (no DuoCache, e.g. use_cache=False).
        return select_attention(model, ATTENTION_NAME, duo_attention, PLAN_ATTRIBUTE,
                                lambda module: plans[module.layer_idx],
                                modules=[layer.self_attn for layer in adapter.decoder_layers])

    def new_cache(self, lm: Any, prefix: Any) -> DuoCache:
        plans = self.head_plans(lm.adapter.num_layers, lm.adapter.num_kv_heads)
        # Without a prefix (generate on a whole prompt) the retrieval heads grow by what they need + the reserve.
        capacity = 0 if prefix is None else prefix.num_tokens + lm.decode_reserve
        return DuoCache(plans, capacity, lm.decode_reserve)

    def estimate_restore_kv_bytes(self, geometry: Any, prefix_tokens: Any, reserve: int = 0) -> int:
        # The restorer saves the prefix's streaming slots that a try of `reserve` tokens overwrites.
        plans = self.head_plans(geometry.num_layers, geometry.num_kv_heads)
        return duo_restore_kv_bytes(plans, geometry.head_dim, prefix_tokens.total, reserve, geometry.dtype_bytes)

    def kv_bytes_of_layers(self, geometry: Any, per_layer: Sequence[int]) -> int:
        # Retrieval heads grow with every token; streaming heads stop at sink + recent + 1. The peak is at the end.
        plans = self.head_plans(geometry.num_layers, geometry.num_kv_heads)
        return sum(duo_kv_bytes([plan], geometry.head_dim, count, geometry.dtype_bytes)
                   for plan, count in zip(plans, per_layer))

    def estimate_prefill_flops(self, geometry: Any, tokens_per_layer: Sequence[int],
                               tokens: Any = None) -> dict[str, int]:
        # Streaming heads score each query against the sink and its window only (the query included).
        costs = super().estimate_prefill_flops(geometry, tokens_per_layer, tokens)
        groups = geometry.num_heads // geometry.num_kv_heads
        plans = self.head_plans(geometry.num_layers, geometry.num_kv_heads)
        for plan, count in zip(plans, tokens_per_layer):
            window = count if plan.full_first_chunk else plan.sink + plan.recent + 1
            saved = causal_pairs(count) - window_pairs(count, window)
            costs["attention_flops"] -= score_flops(len(plan.streaming_heads) * groups, geometry.head_dim, saved)
        return costs

    @classmethod
    def budget_settings(cls, budget: float, geometry: Any, tokens: Any) -> dict[str, Any]:
        # A fraction ρ of retrieval heads keeps ρ of the visual KV, up to the streaming heads' sink + recent.
        if not 0 < budget <= 1:
            raise ValueError(f"duo: budget must be in (0, 1], got {budget}")
        return {"sparsity": round(1.0 - budget, 6)}

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # Sparsity 0 keeps every head a retrieval head: the baseline's attention, through duo's own code.
        directory = tmp_path / "duo-pattern"
        save_pattern(directory, np.random.default_rng(0).random((geometry.num_layers, geometry.num_kv_heads)),
                     sink_size=4, recent_size=16)
        return {"pattern": str(directory), "sparsity": 0.0, "sink": 4, "recent": 16}


def window_pairs(tokens: int, window: int) -> int:
    """(query, key) pairs when query p sees min(p + 1, window) keys."""
    inside = min(tokens, window)
    return causal_pairs(inside) + (tokens - inside) * window
