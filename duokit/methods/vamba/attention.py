"""The `duokit_vamba` attention function and the MLP skip, driven by one prefill call's plan.

The method's prefill hands each call a `ChunkPlan` as a language-model keyword; transformers passes it
through every decoder layer to the attention function (`AttentionInterface`), and a forward pre-hook on
each decoder layer reads it for the MLP hooks. Without a plan (text before or after the video, the
question, the answer) a call attends causally to every cached key with transformers' own sdpa call
(`duokit.methods.attention.causal`, exact), so a call the method leaves global is bit-identical to the
baseline.

A call of a video chunk that starts after the sinks (`layout.py`) attends to the keys [0, sink_end) and
[chunk_start, …) only: those keys are gathered from the cache (O(sink_end + chunk) per call, not the
whole cache) and attended lower-right causally, so the prefill's video work is O(N·c), not a masked N×N.
The KV cache itself stays full: the text that follows reads every video key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from duokit.methods.attention import causal

ATTENTION_NAME = "duokit_vamba"
# The language-model keyword carrying one prefill call's `ChunkPlan`.
PLAN_KWARG = "duokit_vamba_plan"


class ChunkPlan(NamedTuple):
    sink_end: int  # keys [0, sink_end): system prefix + sinks, seen by every chunk
    chunk_start: int  # -1: every earlier key is visible; else this call's rows see [chunk_start, …) of their chunk
    video_rows: torch.Tensor | None  # (q,) bool: rows that skip the MLP in layers >= skip_mlp_from (None: none)


def vamba_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function; returns `[B, q_len, H_q, D]` as transformers expects."""
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME} attention supports batch size 1 without padding (got a mask)")
    plan: ChunkPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None or plan.chunk_start < 0:
        return causal(module, query, key, value, scaling, dropout, exact=True), None
    return local_attention(module, query, key, value, scaling, dropout, plan.sink_end, plan.chunk_start), None


def local_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scaling: float | None, dropout: float, sink_end: int, chunk_start: int) -> torch.Tensor:
    """Queries = the last q_len of the kv_len cached keys, all inside one chunk that starts at
    `chunk_start` > `sink_end`: each sees the keys [0, sink_end) and its chunk's keys up to itself."""
    first_query = key.shape[-2] - query.shape[-2]
    if not sink_end < chunk_start <= first_query:
        raise ValueError(f"{ATTENTION_NAME}: a chunk starting at {chunk_start} after sinks ending at {sink_end} "
                         f"cannot hold queries from position {first_query}")
    # Every query sees all gathered keys before its own block and its block causally: lower-right causal.
    key = torch.cat([key[..., :sink_end, :], key[..., chunk_start:, :]], dim=-2)
    value = torch.cat([value[..., :sink_end, :], value[..., chunk_start:, :]], dim=-2)
    return causal(module, query, key, value, scaling, dropout)


class MlpSkip:
    """Hooks that run a decoder layer's MLP on the rows that are not video tokens only, the video rows'
    MLP output being zero (their residual stream unchanged by the MLP, as Vamba's video tokens never
    pass the LLM's MLP). The rows of the current call come from its plan (a decoder-layer pre-hook)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # (q,) bool video rows of the call in flight, or None

    def layer_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        plan = kwargs.get(PLAN_KWARG)
        self.rows = None if plan is None else plan.video_rows

    def mlp_pre_hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.rows is None:
            return None
        return (args[0][:, ~self.rows], *args[1:])

    def mlp_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        full = output.new_zeros(output.shape[0], len(self.rows), output.shape[-1])
        full[:, ~self.rows] = output
        return full
