"""DuoAttention head patterns in the official format, and the official binarisation rule.

A pattern directory holds `full_attention_heads.tsv` (one row per layer, one column per KV head,
real gate values written by `np.savetxt(..., delimiter="\\t")`) and `config.json` (at least
`sink_size` and `recent_size`). Reference: mit-han-lab/duo-attention(`duo_attn/utils.py`:
`load_attn_pattern`, `sparsify_attention_heads`, `save_full_attention_heads`).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duokit.io import atomic_write_json, atomic_write_text, read_json

GATES_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
# The official evaluation scripts call `seed_everything(42)` before `sparsify_attention_heads`, whose
# tie-breaking noise comes from numpy's legacy global generator; RandomState(42) reproduces it.
OFFICIAL_SEED = 42
# `sparsify_attention_heads` adds U(0, 1e-6) noise to break ties (mit-han-lab/duo-attention).
TIE_BREAK_NOISE = 1e-6


@dataclass(frozen=True)
class Pattern:
    """Gates of one model: `gates[layer, kv_head]` in [0, 1] (1 = needs full attention)."""

    gates: np.ndarray
    sink_size: int
    recent_size: int
    source: Path | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.gates.shape)

    def check_shape(self, num_layers: int, num_kv_heads: int) -> None:
        """Raise a clear error unless the pattern has one row per layer and one column per KV head."""
        if self.shape != (num_layers, num_kv_heads):
            where = self.source / GATES_FILE if self.source else "the pattern"
            raise ValueError(
                f"{where}: gate matrix has shape {self.shape} (layers x KV heads) but the model has "
                f"{(num_layers, num_kv_heads)}; use a pattern trained for this model"
            )


def load_pattern(directory: str | os.PathLike) -> Pattern:
    """Read an official pattern directory; gates are clipped to [0, 1] as the official loader does."""
    directory = Path(directory)
    gates_path, config_path = directory / GATES_FILE, directory / CONFIG_FILE
    for path in (gates_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; a DuoAttention pattern directory needs {GATES_FILE} and {CONFIG_FILE}"
            )
    try:
        gates = np.loadtxt(gates_path, dtype=float, delimiter="\t", ndmin=2)
    except ValueError as err:
        raise ValueError(f"{gates_path}: not a tab-separated matrix of numbers ({err})") from err
    if gates.size == 0 or not np.isfinite(gates).all():
        raise ValueError(f"{gates_path}: gate matrix is empty or has non-finite values")
    config = read_json(config_path)
    missing = [key for key in ("sink_size", "recent_size") if key not in config]
    if missing:
        raise ValueError(f"{config_path}: missing {', '.join(missing)}")
    return Pattern(np.clip(gates, 0.0, 1.0), int(config["sink_size"]), int(config["recent_size"]), directory)


def save_pattern(directory: str | os.PathLike, gates: np.ndarray, sink_size: int, recent_size: int,
                 **config: object) -> Path:
    """Write `gates` and `config.json` in the official format (extra config keys are kept)."""
    directory = Path(directory)
    gates = np.asarray(gates, dtype=float)
    if gates.ndim != 2:
        raise ValueError(f"gates must be a 2-D (layers x KV heads) matrix, got shape {gates.shape}")
    buffer = io.StringIO()
    np.savetxt(buffer, gates, delimiter="\t")
    atomic_write_text(directory / GATES_FILE, buffer.getvalue())
    atomic_write_json(directory / CONFIG_FILE, {**config, "sink_size": int(sink_size),
                                                 "recent_size": int(recent_size)})
    return directory


def binarize(gates: np.ndarray, sparsity: float, per_layer: bool = False,
             seed: int = OFFICIAL_SEED) -> tuple[np.ndarray, float]:
    """Choose retrieval heads: `sparsify_attention_heads` of the official code, made deterministic.

    `sparsity` is the target fraction of streaming heads. Noise U(0, 1e-6) from `RandomState(seed)`
    breaks ties; the threshold is the `sparsity` quantile (numpy's linear rule) over all layers x
    heads (or within each layer when `per_layer`); heads with gate >= threshold are retrieval heads.
    Returns the boolean retrieval matrix and the achieved sparsity.
    """
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0.0 <= sparsity <= 1.0):
        raise ValueError(f"sparsity must be a fraction of streaming heads in [0, 1], got {sparsity!r}")
    noisy = np.asarray(gates, dtype=float) + np.random.RandomState(seed).uniform(0, TIE_BREAK_NOISE, np.shape(gates))
    if sparsity >= 1:
        threshold = 2.0  # every head streaming (official special case)
    elif sparsity <= 0:
        threshold = -1.0  # every head retrieval
    elif per_layer:
        threshold = np.quantile(noisy, sparsity, axis=1, keepdims=True)
    else:
        threshold = np.quantile(noisy, sparsity)
    retrieval = noisy >= threshold
    return retrieval, float(1.0 - retrieval.mean())


def retrieval_heads_per_layer(retrieval: np.ndarray) -> list[list[int]]:
    """Indices of the retrieval KV heads of each layer."""
    return [np.flatnonzero(row).tolist() for row in retrieval]
