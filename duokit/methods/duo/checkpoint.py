"""Training checkpoints that survive a killed Colab session and resume bit-exactly.

One file, `RUN/ckpt/latest.pt`, rewritten every K steps: serialised in memory, written to a temp file
in the same folder and `os.replace`d (so a Drive copy is either the old or the new checkpoint, never a
torn one — write-then-rename, docs/colab.md). It loads with `torch.load(weights_only=True)`, so
every RNG state is stored as tensors and plain Python values only.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duokit.io import atomic_write_bytes

CHECKPOINT_FILE = Path("ckpt") / "latest.pt"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) generator states, weights_only-safe."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write `state` (tensors and plain values) to `RUN/ckpt/latest.pt`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(Path(run_dir) / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or None when the run has no checkpoint yet."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"{path}: cannot read the training checkpoint ({err}); delete it to restart the run "
                         "from step 0, or point --out at another folder") from err
