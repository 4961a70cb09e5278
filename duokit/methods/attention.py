"""Attention machinery shared by every method: selecting an attention function for the language model
only, and causal attention that needs no mask from the model.

A method that registers its own attention function (transformers' `AttentionInterface`) gets
`attention_mask=None` from the model (a name that is not sdpa/eager/flash gets no mask built for it),
so these helpers work from the shapes alone: the queries are the last `q_len` positions of the
`kv_len` keys ("lower-right" causal alignment). That also serves a layer whose KV length differs from
its neighbours' (a cache that evicts or pools per layer): each call only needs its own keys.

- `causal`: transformers' own sdpa call when no mask is needed (q_len 1 or q_len = kv_len), or with
  `exact` (the boolean causal mask transformers would build), so a method at its identity setting is
  bit-identical to the baseline; else the CPU flash path (`causal_cpu`) or, on GPU, `causal_expanded`
  (a lower-right causal sdpa call).
- `causal_cpu`: two mask-free CPU flash calls (past keys; the chunk's own keys causally) merged by
  their log-sum-exp (`merge_by_lse`).
- `packed_decode`: one query token with grouped KV heads, each KV head read once (transformers'
  `pack_gqa` layout).
- `causal_attention`: an `AttentionInterface` function built on `causal` (batch 1, no padding).
- `select_attention`: register a function, select it for the language model only (the vision tower
  keeps its own) and give each attention module a per-module value; undone on exit.
Batch size 1; padding masks are not supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAUSAL_ATTENTION = "duokit_causal"


def causal(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None, dropout: float = 0.0, exact: bool = False) -> torch.Tensor:
    """Causal attention aligned bottom-right: query `[B, H_q, q, D]`, keys/values `[B, H_kv, kv, D]`
    with kv >= q; returns `[B, q, H_q, D]` as transformers expects.

    `exact`: always the baseline's own call (transformers' sdpa with the boolean causal mask it would
    build), so a layer the method leaves unchanged reproduces the baseline bit for bit in every prefill
    chunk; otherwise a chunk after the first takes the faster paths below (equal up to float rounding).
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len == 1 or q_len == kv_len:
        # Same call as the baseline, so an unmodified layer reproduces it bit for bit.
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)[0]
    if exact:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=dropout,
                                      scaling=scaling)[0]
    if query.device.type == "cpu" and not dropout:
        return causal_cpu(query, key, value, scaling)
    return causal_expanded(query, key, value, scaling, dropout)


def causal_expanded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                    dropout: float = 0.0) -> torch.Tensor:
    """`causal`'s GPU path: one sdpa call with torch's lower-right causal bias, the KV heads expanded to the
    query heads. Returns `[B, q, H_q, D]`."""
    # A masked GQA call falls back to the math kernel, which materialises q_len x kv_len scores per head;
    # expand the KV heads instead, as transformers' sdpa path does (CUDA kernels take this mask unmaterialised).
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = causal_lower_right(query.shape[-2], key.shape[-2])
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return output.transpose(1, 2).contiguous()


def packed_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One query token: the query heads of each KV head become that head's query rows (transformers'
    `pack_gqa`), so each KV head is read once per step, not once per query head as with `enable_gqa`
    (3x faster on CPU at 32k keys). No mask is needed: the single query sees every cached key.
    Returns `[B, 1, H_q, D]`."""
    batch, num_heads, _, head_dim = query.shape
    packed = query.reshape(batch, key.shape[1], num_heads // key.shape[1], head_dim)
    return F.scaled_dot_product_attention(packed, key, value, scale=scaling).reshape(batch, 1, num_heads, head_dim)


def causal_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Bottom-right causal attention as two mask-free calls merged by their log-sum-exp: every query sees
    all past keys, and the chunk's own keys causally (q_len = kv_len, top-left = bottom-right).

    On CPU a masked call would materialise the q_len x kv_len mask (then a float copy of it inside sdpa)
    and expand the KV heads; here the CPU flash kernel takes the KV heads as they are (GQA) and skips the
    masked half of the in-chunk blocks. Equal to the masked call up to float rounding.
    """
    past = key.shape[-2] - query.shape[-2]
    if past == 0:
        return flash_cpu(query, key, value, True, scaling)[0].transpose(1, 2).contiguous().to(query.dtype)
    past_part = flash_cpu(query, key[..., :past, :], value[..., :past, :], False, scaling)
    chunk_part = flash_cpu(query, key[..., past:, :], value[..., past:, :], True, scaling)
    return merge_by_lse([past_part, chunk_part]).to(query.dtype)


def flash_cpu(query, key, value, is_causal: bool, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa's CPU flash kernel, which also returns the log-sum-exp: (output `[B, H, q, D]` float32,
    lse `[B, H, q]` float32); handles GQA natively."""
    if key.shape[-2] == 0:  # the kernel divides by the key count: no keys kills the process (SIGFPE)
        raise ValueError("flash_cpu: no keys to attend to")
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                            scale=scaling)
    return output.float(), lse


def merge_by_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets, from each set's (output `[B, H, q, D]`,
    log-sum-exp `[B, H, q]`); returns `[B, q, H, D]` float32."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    # [B, H, q] weights -> [B, q, H, 1]; the kernel's outputs are [B, q, H, D] in memory, so no copy here.
    return sum(output.transpose(1, 2) * (part_lse - lse).exp().transpose(1, 2)[..., None]
               for output, part_lse in parts)


def causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: lower-right causal attention over whatever keys the layer's
    cache returned (their number may differ from layer to layer), exactly the baseline's call when the
    lengths agree with the baseline's."""
    if attention_mask is not None:
        raise ValueError(f"{CAUSAL_ATTENTION} attention supports batch size 1 without padding (got a mask)")
    return causal(module, query, key, value, scaling, dropout, exact=True), None


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's attention modules (the vision tower's have another config)."""
    text_config = model.config.get_text_config()
    return [m for m in model.modules() if getattr(m, "config", None) is text_config and hasattr(m, "layer_idx")
            and hasattr(m, "num_key_value_groups")]


@contextlib.contextmanager
def select_attention(model: torch.nn.Module, name: str, function: Callable, attribute: str | None = None,
                     value_for_module: Callable[[torch.nn.Module], Any] | None = None,
                     modules: Sequence[torch.nn.Module] | None = None) -> Iterator[None]:
    """Register `function` as `name` and select it for the language model only; with `attribute`, give
    each attention module (`modules`, default: found by the text config) `attribute =
    value_for_module(module)`, the channel through which per-run state reaches the function (it gets
    the module, not the model). The previous implementation is restored and the attributes removed on exit.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    text_config = model.config.get_text_config()
    is_vlm = text_config is not model.config
    previous = text_config._attn_implementation
    modules = list(attention_modules(model) if modules is None else modules)
    model.set_attn_implementation({"text_config": name} if is_vlm else name)
    if attribute:
        for module in modules:
            setattr(module, attribute, value_for_module(module))
    try:
        yield
    finally:
        if attribute:
            for module in modules:
                delattr(module, attribute)
        model.set_attn_implementation({"text_config": previous} if is_vlm else previous)
