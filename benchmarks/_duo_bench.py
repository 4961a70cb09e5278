"""Shared pieces of the DuoAttention benchmarks: a mid-size random-init Qwen2 LM, a seeded pattern, prefill.

The model follows issue 5's suggestion (hidden 1024, 8 layers, 16 query / 4 KV heads); the deploy
setting is the paper's: 50% streaming heads, sink 64, recent 256 (arXiv:2410.10819;
https://github.com/mit-han-lab/duo-attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")


def build_model(args: argparse.Namespace):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=1 << 17, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=getattr(torch, args.dtype))
    return model.to(args.device).eval()


def make_duo(args: argparse.Namespace, directory: str | Path | None = None, sparsity: float | None = None):
    """The `duo` method on a seeded random pattern of the model's shape (`sparsity`: default `args.sparsity`)."""
    from duokit.methods.base import get_method
    from duokit.methods.duo.pattern import save_pattern

    directory = Path(directory or tempfile.mkdtemp(prefix="duo-bench-"))
    gates = np.random.default_rng(0).random((args.layers, args.kv_heads))
    save_pattern(directory, gates, sink_size=args.sink, recent_size=args.recent)
    sparsity = args.sparsity if sparsity is None else sparsity
    return get_method("duo", pattern=str(directory), sparsity=sparsity, sink=args.sink, recent=args.recent)


def token_ids(length: int, vocab: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1)).to(device)


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor, chunk: int, label: str = "prefill") -> torch.Tensor:
    """Feed `ids` in chunks into `cache`; returns the last logits."""
    logits = None
    for start in tqdm(range(0, ids.shape[1], chunk), desc=label, leave=False):
        logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    return logits


@torch.no_grad()
def decode_step(model, cache, token: torch.Tensor) -> torch.Tensor:
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def lm(model):
    """The engine's view of the benchmark model (a text LM: no processor needed)."""
    from duokit.engine import LM
    from duokit.models.text import TextAdapter

    return LM(model, TextAdapter(model, None))


def applied(model, method):
    """`with applied(model, method):` applies `method` (None = the sdpa baseline, nothing to apply)."""
    return method.apply(model, lm(model).adapter) if method else contextlib.nullcontext()


def new_cache(model, method, tokens: int = 0, reserve: int = 0):
    """The cache the engine would give `method` for a prefix of `tokens` tokens with `reserve` more to
    decode (None = stock transformers: a DynamicCache)."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    if method is None:
        return DynamicCache(config=model.config)
    engine_lm = lm(model)
    engine_lm.decode_reserve = reserve
    return method.new_cache(engine_lm, SimpleNamespace(num_tokens=tokens))


# --- fair setups (docs/decoding.md) ------------------------------------------------------------------
# "stock": what a user runs otherwise (transformers' sdpa + DynamicCache); "stock-preallocated": the same
# attention on duokit's default preallocated cache; "dense": duo's own kernels and cache with every head a
# retrieval head (HeadPlan.exact=False), the baseline for what duo saves; "duo-S": duo at sparsity S.


def setups(args: argparse.Namespace, sparsities=(0.5, 0.75)) -> dict:
    """{name: (method or None, cache kind)}; the cache kind is "dynamic", "preallocated" or "duo"."""
    chosen = {"stock": (None, "dynamic"), "stock-preallocated": (None, "preallocated"),
              "dense": (make_duo(args, sparsity=0.0), "duo")}
    for sparsity in sparsities:
        chosen[f"duo-{sparsity:g}"] = (make_duo(args, sparsity=sparsity), "duo")
    return chosen


def filled_cache(model, method, kind: str, length: int, reserve: int, seed: int = 0):
    """A cache of `kind` holding `length` random tokens per layer (decode time depends on the sizes only),
    with room for `reserve` more; duo setups get `exact=False` plans (duo's kernels on every layer)."""
    from dataclasses import replace

    from transformers import DynamicCache

    from duokit.methods.duo.cache import DuoCache
    from duokit.methods.preallocated import PreallocatedCache

    config = model.config
    if kind == "dynamic":
        cache = DynamicCache(config=config)
    elif kind == "preallocated":
        cache = PreallocatedCache(config.num_hidden_layers, length + reserve, reserve)
    else:
        # exact=False: an all-retrieval layer (every layer of "dense") runs the kernels of a mixed one.
        plans = method.head_plans(config.num_hidden_layers, config.num_key_value_heads)
        cache = DuoCache([replace(plan, exact=False) for plan in plans], length + reserve, reserve)
    generator = torch.Generator().manual_seed(seed)
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, length, head_dim)
    dtype = next(model.parameters()).dtype
    for index in range(config.num_hidden_layers):
        keys, values = (torch.randn(shape, generator=generator).to(model.device, dtype) for _ in range(2))
        cache.update(keys, values, index)
    return cache


def bytes_moved_per_step(cache, kind: str, weights: int) -> int:
    """Bytes a decode step reads or writes: the weights, the KV attention reads, and what the cache
    writes to append (DynamicCache: `torch.cat` reads and rewrites the whole KV; preallocated, and duo's
    retrieval heads and streaming ring alike: one token written in place)."""
    from duokit.metrics import kv_cache_bytes

    kv = kv_cache_bytes(cache)
    return weights + (3 * kv if kind == "dynamic" else kv)


def allocator() -> dict:
    """The glibc malloc settings of this process (they decide whether big `torch.cat` results get fresh
    mmapped pages each step, which dominated the old baseline at 32k)."""
    import os

    return {key: os.environ[key] for key in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")
            if key in os.environ} or {"glibc": "default"}


def ensure_allocator(argv: list[str]) -> None:
    """Re-run this script with MALLOC_MMAP_MAX_=0 (no mmapped allocations: freed blocks are reused from
    the heap) unless the caller chose glibc settings or `--default-allocator`; mallopt(3)."""
    import os
    import sys

    if "--default-allocator" in argv or any(key.startswith("MALLOC_") for key in os.environ):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_MAX_": "0"})


def run_record(argv: list[str]) -> dict:
    """What a JSON result records about its run: the command, the UTC date, torch threads, allocator."""
    import datetime
    import sys

    return {"command": " ".join(["python", *sys.argv[:1], *argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "allocator": allocator(), "torch": torch.__version__}


def run_memory_worker(script: str, argv: list[str], variant: str, length: int) -> dict:
    """Run `script` in a fresh process for one (variant, length) memory measurement; its last stdout line
    is the JSON row. glibc serves allocations >= 64 KiB with mmap and returns them on free, so RSS follows
    the live tensors instead of what the heap allocator keeps after a free (mallopt(3), M_MMAP_THRESHOLD)."""
    command = [sys.executable, script, *argv, "--variant", variant, "--worker-length", str(length)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} at {length} tokens failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
