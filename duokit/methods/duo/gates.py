"""DuoAttention gates and the mixed attention they train (mit-han-lab/duo-attention).

One gate α ∈ [0, 1] per (layer, KV head), initialised at 1. The batch holds the teacher (first half,
plain causal attention) and the student (second half) — the official "two-way" forward. Each student
KV head outputs `α·full + (1 − α)·streaming`, where streaming attention sees the first `sink` tokens,
the `recent` tokens before the query and the query itself: the window of inference (duokit's one
convention for `recent`, docs/duoattention.md "The meaning of `recent`"). The official training mask
(`generate_streaming_mask` in `duo_attn/patch/streaming_attn.py`) counts the query among its `recent`
tokens, one fewer. Two streaming masks:

- `token` (default): that exact token window, the official `sdpa` option with inference's `recent`.
- `blocksparse`: the official default (`streaming_attn_implementation="blocksparse"`, the
  Block-Sparse-Attention kernel): `block`-token blocks, `ceil(sink/block)` sink blocks and
  `ceil(recent/block)` local blocks counting the query's own, causal inside it; at block 128 and
  128/256 a query sees the first 128 tokens and the last 129–256, itself included. duokit applies
  this mask with sdpa (same attention, not the kernel's speed).

Two variants of `full`:

- `paper` (default): full attention on the student's own q/k/v — the paper's formula.
- `official-teacher`: the teacher's full-attention output at that layer, as the released
  `llama_duo_attention_forward_two_way` (`duo_attn/patch/llama.py`) does; it saves one full-attention pass
  per layer (docs/duo_training.md, "The two variants of "full"").

The function is registered with transformers' `AttentionInterface` under its own name and selected
for the language model only (`duokit.methods.attention.select_attention`); the gates and settings reach
it through an attribute of each attention module (`duokit_duo_gates`), since the attention function
gets the module but not the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from duokit.methods.attention import select_attention
from duokit.methods.duo.train import OFFICIAL_BLOCK_SIZE, STREAMING_MASKS

TRAINING_ATTENTION = "duokit_duo_train"
VARIANTS = ("paper", "official-teacher")
GATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Official `initial_value` (mit-han-lab/duo-attention); the VILA port's 0.5 is not used.
INITIAL_GATE = 1.0


class DuoGates(torch.nn.Module):
    """The trainable gates: `gates[layer, kv_head]`, float32 unless `dtype` says otherwise."""

    def __init__(self, num_layers: int, num_kv_heads: int, initial_value: float = INITIAL_GATE,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.gates = torch.nn.Parameter(torch.full((num_layers, num_kv_heads), float(initial_value), dtype=dtype))

    def values(self):
        """The gates as a float32 numpy array (numpy has no bfloat16)."""
        return self.gates.detach().float().cpu().numpy()

    def regularization(self) -> torch.Tensor:
        """`l1_loss` of the official code (`duo_attn/loss.py`, applied in `duo_attn/train.py::train`): mean |α|
        over all gates, on the live parameter (docs/duo_training.md, "What is trained", row "L1 term")."""
        return self.gates.abs().mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project back onto [0, 1] (the official `map_full_attention_heads(clamp_(0, 1))`)."""
        self.gates.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class MixedAttentionPlan:
    gates: DuoGates
    sink: int
    recent: int
    variant: str
    mask: str = "token"
    block_size: int = OFFICIAL_BLOCK_SIZE


@lru_cache(maxsize=4)
def streaming_mask(length: int, sink: int, recent: int, device: torch.device) -> torch.Tensor:
    """`[length, length]` bool: query i sees key j iff j <= i and (j < sink or i − j <= recent).

    The official `generate_streaming_mask` (`triu(diagonal=1 − recent) | first sink columns`, causal)
    with its window one token wider, so that it equals inference's window for the same `recent`.
    """
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    return (key <= query) & ((key < sink) | (query - key <= recent))


@lru_cache(maxsize=4)
def blocksparse_mask(length: int, sink: int, recent: int, block_size: int, device: torch.device) -> torch.Tensor:
    """`[length, length]` bool: the official block-sparse streaming pattern at token level.

    Blocks of `block_size` tokens from position 0; query i sees key j iff j <= i and (j's block is one of
    the first ceil(sink / block_size), or i's block minus j's block < ceil(recent / block_size)).
    """
    sink_blocks, local_blocks = -(-sink // block_size), -(-recent // block_size)
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    query_block, key_block = query // block_size, key // block_size
    return (key <= query) & ((key_block < sink_blocks) | (query_block - key_block < local_blocks))


def _expand_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, H_kv, T, D]` -> `[B, H_kv·groups, T, D]` in `repeat_kv` order (KV head h serves h·groups…)."""
    return states.repeat_interleave(groups, dim=1) if groups > 1 else states


def full_attention(query, key, value, scaling) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def streaming_attention(query, key, value, scaling, plan: MixedAttentionPlan) -> torch.Tensor:
    length = query.shape[-2]
    if plan.mask == "blocksparse":
        mask = blocksparse_mask(length, plan.sink, plan.recent, plan.block_size, query.device)
    else:
        mask = streaming_mask(length, plan.sink, plan.recent, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def mixed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Teacher half: causal attention. Student half: gated mix. Returns `[B, T, H_q, D]`."""
    plan: MixedAttentionPlan | None = getattr(module, "duokit_duo_gates", None)
    if plan is None:
        raise RuntimeError(f"{TRAINING_ATTENTION} attention needs `enable_gate_training(model, gates, ...)`")
    if attention_mask is not None:
        raise ValueError(f"{TRAINING_ATTENTION} attention takes unpadded sequences only (got an attention mask)")
    batch, _, q_len, _ = query.shape
    if batch % 2 or key.shape[-2] != q_len:
        raise ValueError(f"{TRAINING_ATTENTION} expects a teacher+student batch (even size) without a KV cache; "
                         f"got batch {batch}, {q_len} queries, {key.shape[-2]} keys")
    groups = module.num_key_value_groups
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    half = batch // 2
    # The teacher never depends on the gates: no graph for it (the official code runs it under no_grad too).
    with torch.no_grad():
        teacher = full_attention(query[:half], key[:half], value[:half], scaling)
    student_q, student_k, student_v = query[half:], key[half:], value[half:]
    stream = streaming_attention(student_q, student_k, student_v, scaling, plan)
    full = teacher if plan.variant == "official-teacher" else full_attention(student_q, student_k, student_v, scaling)
    # Mix in float32 so bf16 models and bf16 gates still get a float32 gradient, rounded once to the gates'
    # dtype (α's two paths, summed in bf16, cancel: a 20% error in the test's example).
    alpha = plan.gates.gates[module.layer_idx].float().repeat_interleave(groups)[None, :, None, None]
    student = (alpha * full.float() + (1 - alpha) * stream.float()).to(query.dtype)
    return torch.cat([teacher, student]).transpose(1, 2).contiguous(), None


def check_window(sink: int, recent: int, mask: str = "token", block_size: int = OFFICIAL_BLOCK_SIZE) -> None:
    """One clear error for a streaming window the mixed attention cannot use."""
    if mask not in STREAMING_MASKS:
        raise ValueError(f"streaming mask must be one of {STREAMING_MASKS}, got {mask!r}")
    if sink < 0 or recent < 0:
        raise ValueError(f"need sink >= 0 and recent >= 0, got sink={sink}, recent={recent}")
    if mask == "blocksparse" and (block_size < 1 or recent < 1):
        raise ValueError(f"the blocksparse mask needs --block-size >= 1 and --recent >= 1 (a query must see its own "
                         f"block), got block size {block_size}, recent {recent}")


def window_span(sink: int, recent: int, mask: str = "token", block_size: int = OFFICIAL_BLOCK_SIZE) -> tuple[int, int]:
    """(sink, recent) tokens a streaming query can see at most: block multiples under `blocksparse`."""
    if mask == "blocksparse":
        return -(-sink // block_size) * block_size, -(-recent // block_size) * block_size
    return sink, recent


def enable_gate_training(model: torch.nn.Module, gates: DuoGates, sink: int, recent: int, variant: str = "paper",
                         mask: str = "token", block_size: int = OFFICIAL_BLOCK_SIZE,
                         ) -> contextlib.AbstractContextManager:
    """Select the mixed attention for the language model only (a context manager that undoes it)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_window(sink, recent, mask, block_size)
    text_config = model.config.get_text_config()
    expected = (text_config.num_hidden_layers, text_config.num_key_value_heads)
    if tuple(gates.gates.shape) != expected:
        raise ValueError(f"gates have shape {tuple(gates.gates.shape)}; the model needs {expected} "
                         "(layers x KV heads)")
    plan = MixedAttentionPlan(gates, sink, recent, variant, mask, block_size)
    return select_attention(model, TRAINING_ATTENTION, mixed_attention, "duokit_duo_gates", lambda module: plan)
