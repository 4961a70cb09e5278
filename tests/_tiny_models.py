"""Tiny models shared by the model and engine tests: each family is loaded once per test process.

A test that changes a shared model or adapter must undo it (methods do, when their `apply` exits;
`monkeypatch` does).
"""

from __future__ import annotations

from functools import cache

from duokit.models import load_vlm


@cache
def tiny(family: str) -> tuple:
    """`load_vlm(f"tiny:{family}")`: (model, processor, adapter) with dtype and device "auto"."""
    return load_vlm(f"tiny:{family}")
