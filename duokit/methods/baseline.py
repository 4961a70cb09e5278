"""`baseline`: the unmodified model (sdpa attention, full KV cache)."""

from __future__ import annotations

from dataclasses import dataclass

from duokit.methods.base import Method, register_method


@register_method
@dataclass
class Baseline(Method):
    name = "baseline"
    decodes_tries_together = True
