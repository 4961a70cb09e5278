"""Shared pieces of the DuoAttention benchmarks: a mid-size random-init Qwen2 LM, a seeded pattern, prefill.

The model follows issue 5's suggestion (hidden 1024, 8 layers, 16 query / 4 KV heads); the deploy
setting is the paper's: 50% streaming heads, sink 64, recent 256 (arXiv:2410.10819;
https://github.com/mit-han-lab/duo-attention).
"""

from __future__ import annotations

import argparse
import contextlib
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


def make_duo(args: argparse.Namespace, directory: str | Path | None = None):
    """The `duo` method on a seeded random pattern of the model's shape."""
    from duokit.methods.base import get_method
    from duokit.methods.duo.pattern import save_pattern

    directory = Path(directory or tempfile.mkdtemp(prefix="duo-bench-"))
    gates = np.random.default_rng(0).random((args.layers, args.kv_heads))
    save_pattern(directory, gates, sink_size=args.sink, recent_size=args.recent)
    return get_method("duo", pattern=str(directory), sparsity=args.sparsity, sink=args.sink, recent=args.recent)


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


def new_cache(model, method):
    from transformers import DynamicCache

    return DynamicCache(config=model.config) if method is None else method.new_cache(lm(model), None)
