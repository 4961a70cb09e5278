"""`duo`: DuoAttention inference — retrieval heads keep the full KV cache, streaming heads sink + recent."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from duokit.methods.base import Method, register_method
from duokit.methods.duo.pattern import Pattern, binarize, load_pattern


@register_method
@dataclass
class Duo(Method):
    """Settings: `pattern` (official pattern directory), `sparsity` (fraction of streaming KV heads,
    global quantile rule), `sink`/`recent` (deploy sizes; the paper's 64/256, duoattention.md §7),
    `per_layer` (the quantile within each layer instead of globally), `full_first_chunk` (the
    official code's full attention on every head for the first prefill chunk, §8.2)."""

    name = "duo"
    pattern: str | None = None
    sparsity: float = 0.5
    sink: int = 64
    recent: int = 256
    per_layer: bool = False
    full_first_chunk: bool = False

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
        return binarize(self.loaded_pattern.gates, self.sparsity, per_layer=self.per_layer)[0]

    def retrieval_for(self, num_layers: int, num_kv_heads: int) -> np.ndarray:
        """`retrieval`, after checking that the pattern has the model's shape."""
        self.loaded_pattern.check_shape(num_layers, num_kv_heads)
        return self.retrieval

    @contextlib.contextmanager
    def apply(self, model: Any, adapter: Any) -> Iterator[None]:
        from duokit.methods.duo.attention import ATTENTION_NAME, register

        text_config = model.config.get_text_config()
        retrieval = self.retrieval_for(text_config.num_hidden_layers, text_config.num_key_value_heads)
        register()
        is_vlm = text_config is not model.config
        previous = text_config._attn_implementation
        modules = [m for m in model.modules() if getattr(m, "config", None) is text_config and hasattr(m, "layer_idx")
                   and hasattr(m, "num_key_value_groups")]
        # Language model only: the vision tower keeps its own attention (transformers.md §2).
        model.set_attn_implementation({"text_config": ATTENTION_NAME} if is_vlm else ATTENTION_NAME)
        for module in modules:
            row = retrieval[module.layer_idx]
            # Read by the attention function only when it gets plain tensors (no DuoCache).
            module.duokit_duo_plan = (tuple(np.flatnonzero(row).tolist()), tuple(np.flatnonzero(~row).tolist()),
                                      self.sink, self.recent, self.full_first_chunk)
        try:
            yield
        finally:
            for module in modules:
                del module.duokit_duo_plan
            model.set_attn_implementation({"text_config": previous} if is_vlm else previous)

    def new_cache(self, model: Any, adapter: Any) -> Any:
        from duokit.methods.duo.cache import DuoCache

        text_config = model.config.get_text_config()
        retrieval = self.retrieval_for(text_config.num_hidden_layers, text_config.num_key_value_heads)
        return DuoCache(retrieval.tolist(), self.sink, self.recent, self.full_first_chunk)

    def estimate_kv_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int,
                          num_tokens: int, dtype_bytes: int) -> int:
        from duokit.methods.duo.cache import duo_kv_bytes

        return duo_kv_bytes(self.retrieval_for(num_layers, num_kv_heads).tolist(), self.sink, self.recent,
                            head_dim, num_tokens, dtype_bytes)
