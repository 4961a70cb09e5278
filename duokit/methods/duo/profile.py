"""Training-free head scores from attention profiling — a fallback, NOT DuoAttention.

For users without time to train gates: run the frozen model on a few synthetic needle examples and
score each (layer, KV head) by the attention mass that the queries predicting answer tokens put on
keys outside the streaming window (not a sink, not among the `recent` tokens before the query). A head that reads far
context when answering scores high and is kept as a retrieval head. This is attention-profiling
identification (FastGen / RazorAttention style), which the DuoAttention paper found worse than its
optimisation (mit-han-lab/duo-attentionablations); the pattern's config.json says so in `method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from duokit.methods.attention import select_attention

PROFILE_ATTENTION = "duokit_duo_profile"
METHOD_LABEL = "attention profiling (training-free fallback, NOT DuoAttention)"


@dataclass
class ProfilePlan:
    sink: int
    recent: int
    queries: torch.Tensor  # positions whose attention is profiled
    far_mass: torch.Tensor  # [layers, KV heads] running sum over examples


def far_attention_mass(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scaling: float,
                       sink: int, recent: int) -> torch.Tensor:
    """`[B, H_q]`: mean over the profiled queries of the attention mass outside sink + recent."""
    selected = query[:, :, positions]
    logits = selected.float() @ key.float().transpose(-1, -2) * scaling
    keys = torch.arange(key.shape[-2], device=key.device)[None, :]
    rows = positions[:, None]
    logits = logits.masked_fill(keys > rows, float("-inf"))
    far = (keys >= sink) & (rows - keys > recent)  # complement of the streaming window (gates.py, attention.py)
    return (F.softmax(logits, dim=-1) * far).sum(-1).mean(-1)


def profiling_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention (the model runs unchanged) that also records each KV head's far mass."""
    plan: ProfilePlan = module.duokit_duo_profile
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    mass = far_attention_mass(query, key, plan.queries, scaling, plan.sink, plan.recent)
    plan.far_mass[module.layer_idx] += mass[0].view(-1, groups).mean(-1).to(plan.far_mass.device)
    return output.transpose(1, 2).contiguous(), None


def profile_heads(adapter: Any, data: Any, num_examples: int, sink: int, recent: int,
                  progress: bool = True) -> np.ndarray:
    """`[layers, KV heads]` scores in [0, 1]: mean far-attention mass over `num_examples` examples."""
    from tqdm.auto import tqdm

    far_mass = torch.zeros(adapter.num_layers, adapter.num_kv_heads, dtype=torch.float64)
    for index in tqdm(range(num_examples), desc="profile heads", disable=not progress):
        example = data.example(index)
        # The query at position t produces token t + 1: profile the queries that predict answer tokens.
        positions = torch.nonzero(example.answer_mask[1:]).flatten()
        plan = ProfilePlan(sink, recent, positions, far_mass)
        with torch.no_grad(), select_attention(adapter.model, PROFILE_ATTENTION, profiling_attention,
                                               "duokit_duo_profile", lambda module, plan=plan: plan):
            adapter.language_model(inputs_embeds=example.inputs_embeds, position_ids=example.position_ids,
                                   use_cache=False, **example.model_kwargs)
    return (far_mass / num_examples).numpy()
