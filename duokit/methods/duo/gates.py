"""DuoAttention gates and the mixed attention they train (mit-han-lab/duo-attention).

One gate α ∈ [0, 1] per (layer, KV head), initialised at 1. The batch holds the teacher (first half,
plain causal attention) and the student (second half) — the official "two-way" forward. Each student
KV head outputs `α·full + (1 − α)·streaming`, where streaming attention sees the first `sink` tokens,
the `recent` tokens before the query and the query itself: the window of inference (duokit's one
convention for `recent`, docs/duoattention.md "The meaning of `recent`"). The official training mask
(`generate_streaming_mask`, §2) counts the query among its `recent` tokens, one fewer. Two variants of `full`:

- `paper` (default): full attention on the student's own q/k/v — the paper's formula.
- `official-teacher`: the teacher's full-attention output at that layer, as the released
  `llama_duo_attention_forward_two_way` does; it saves one full-attention pass per layer (§2 caveat).

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

TRAINING_ATTENTION = "duokit_duo_train"
VARIANTS = ("paper", "official-teacher")
# Official `initial_value` (mit-han-lab/duo-attention); the VILA port's 0.5 is not used.
INITIAL_GATE = 1.0


class DuoGates(torch.nn.Module):
    """The trainable gates: `gates[layer, kv_head]` (float32, whatever the model's dtype)."""

    def __init__(self, num_layers: int, num_kv_heads: int, initial_value: float = INITIAL_GATE):
        super().__init__()
        self.gates = torch.nn.Parameter(torch.full((num_layers, num_kv_heads), float(initial_value)))

    def regularization(self) -> torch.Tensor:
        """`l1_loss` of the official code: mean |α| over all gates, on the live parameter (§3, §13.1)."""
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


@lru_cache(maxsize=4)
def streaming_mask(length: int, sink: int, recent: int, device: torch.device) -> torch.Tensor:
    """`[length, length]` bool: query i sees key j iff j <= i and (j < sink or i − j <= recent).

    The official `generate_streaming_mask` (`triu(diagonal=1 − recent) | first sink columns`, causal)
    with its window one token wider, so that it equals inference's window for the same `recent`.
    """
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    return (key <= query) & ((key < sink) | (query - key <= recent))


def _expand_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, H_kv, T, D]` -> `[B, H_kv·groups, T, D]` in `repeat_kv` order (KV head h serves h·groups…)."""
    return states.repeat_interleave(groups, dim=1) if groups > 1 else states


def full_attention(query, key, value, scaling) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def streaming_attention(query, key, value, scaling, sink: int, recent: int) -> torch.Tensor:
    mask = streaming_mask(query.shape[-2], sink, recent, query.device)
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
    stream = streaming_attention(student_q, student_k, student_v, scaling, plan.sink, plan.recent)
    full = teacher if plan.variant == "official-teacher" else full_attention(student_q, student_k, student_v, scaling)
    alpha = plan.gates.gates[module.layer_idx].repeat_interleave(groups)[None, :, None, None]
    # Mix in float32 so bf16 models still give the gates full-precision gradients.
    student = (alpha * full.float() + (1 - alpha) * stream.float()).to(query.dtype)
    return torch.cat([teacher, student]).transpose(1, 2).contiguous(), None


def enable_gate_training(model: torch.nn.Module, gates: DuoGates, sink: int, recent: int,
                         variant: str = "paper") -> contextlib.AbstractContextManager:
    """Select the mixed attention for the language model only (a context manager that undoes it)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if sink < 0 or recent < 0:
        raise ValueError(f"need sink >= 0 and recent >= 0, got sink={sink}, recent={recent}")
    text_config = model.config.get_text_config()
    expected = (text_config.num_hidden_layers, text_config.num_key_value_heads)
    if tuple(gates.gates.shape) != expected:
        raise ValueError(f"gates have shape {tuple(gates.gates.shape)}; the model needs {expected} "
                         "(layers x KV heads)")
    plan = MixedAttentionPlan(gates, sink, recent, variant)
    return select_attention(model, TRAINING_ATTENTION, mixed_attention, "duokit_duo_gates", lambda module: plan)
