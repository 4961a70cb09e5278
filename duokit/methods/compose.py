"""`compose`: two (or more) methods that act at different places, run together as one.

`parts="llavolta(layer=2,stride=2) + duo(pattern=DIR,sparsity=0.5)"`: LLaVolta pools the video tokens
at layer K and DuoAttention's split cache (retrieval heads full, streaming heads sink + recent) holds the
pooled sequence. Each part is a registered method with its settings as `--set` text (`name(key=value,
...)`; values may not contain `,` `(` `)` or `+`).

How the hooks combine, in the order the parts are written:
- `install`: every part's, entered in order (LLaVolta checks the model's own sdpa attention before Duo
  selects its attention function for the language model), undone in reverse;
- `prepare_prefix`: chained; `new_cache` and `prefill`: the one part that overrides it (two parts
  overriding the same hook do not compose and are refused);
- KV estimate: the first part's `layer_tokens` (which tokens each layer keeps) and the last part's
  `kv_bytes_of_layers` (what a layer holding them costs) — the two halves of the protocol's estimate;
- prefill FLOPs: the last part's count over the tokens each layer measurably ran on.
At every part's identity the composition is the baseline (tests/test_compose.py, and the conformance suite).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from duokit.methods.base import Method, get_method, method_class, register_method

PART = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\(([^()]*)\))?\s*$")
HOOKS = ("new_cache", "prefill")


def parse_parts(text: str) -> list[tuple[str, dict[str, str]]]:
    """[(method name, {setting: text value})] of a `parts` string."""
    parts = []
    for piece in text.split("+"):
        match = PART.match(piece)
        if not match:
            raise ValueError(f"compose parts: {piece.strip()!r} is not `name` or `name(key=value, ...)`")
        settings = {}
        for pair in filter(None, (p.strip() for p in (match.group(2) or "").split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"compose parts: {pair!r} in {piece.strip()!r} is not key=value")
            settings[key.strip()] = value.strip()
        parts.append((match.group(1), settings))
    return parts


def format_parts(parts: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The `parts` string of [(name, settings)] (what `parse_parts` reads back)."""
    return " + ".join(f"{name}({','.join(f'{k}={v}' for k, v in settings.items())})" for name, settings in parts)


@register_method
@dataclass
class Compose(Method):
    """Settings: `parts`, e.g. "llavolta(layer=2,stride=2) + duo(pattern=DIR,sparsity=0.5)"."""

    name = "compose"
    derived_settings = ("part_settings",)
    parts: str = "baseline"

    def __post_init__(self) -> None:
        self.methods  # noqa: B018 (builds and checks the parts before any model is loaded)

    @cached_property
    def methods(self) -> tuple[Method, ...]:
        parsed = parse_parts(self.parts)
        if any(name == self.name for name, _ in parsed):
            raise ValueError("compose parts cannot themselves be compose")
        methods = tuple(get_method(name, **settings) for name, settings in parsed)
        for hook in HOOKS:
            owners = [m.name for m in methods if getattr(type(m), hook) is not getattr(Method, hook)]
            if len(owners) > 1:
                raise ValueError(f"compose: {' and '.join(owners)} both override `{hook}`; they act at the same "
                                 "place and do not compose")
        return methods

    @property
    def prefix_depends_on_question(self) -> bool:  # type: ignore[override]
        return any(m.prefix_depends_on_question for m in self.methods)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "part_settings": [m.settings() for m in self.methods]}

    def _owner(self, hook: str) -> Method:
        return next((m for m in self.methods if getattr(type(m), hook) is not getattr(Method, hook)),
                    self.methods[-1])

    @contextlib.contextmanager
    def install(self, model: Any, adapter: Any) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for method in self.methods:
                stack.enter_context(method.install(model, adapter))
            yield

    def prepare_prefix(self, prefix: Any, sample: Any, lm: Any) -> Any:
        for method in self.methods:
            prefix = method.prepare_prefix(prefix, sample, lm)
        return prefix

    def new_cache(self, lm: Any, prefix: Any) -> Any:
        return self._owner("new_cache").new_cache(lm, prefix)

    def estimate_restore_kv_bytes(self, geometry: Any, prefix_tokens: Any, reserve: int = 0) -> int:
        return self._owner("new_cache").estimate_restore_kv_bytes(geometry, prefix_tokens, reserve)

    def prefill(self, lm: Any, prefix: Any, cache: Any, chunk_size: int) -> Any:
        return self._owner("prefill").prefill(lm, prefix, cache, chunk_size)

    def layer_tokens(self, geometry: Any, tokens: Any) -> list[int]:
        return self.methods[0].layer_tokens(geometry, tokens)

    def kv_bytes_of_layers(self, geometry: Any, per_layer: Sequence[int]) -> int:
        return self.methods[-1].kv_bytes_of_layers(geometry, per_layer)

    def estimate_prefill_flops(self, geometry: Any, tokens_per_layer: Sequence[int],
                               tokens: Any = None) -> dict[str, int]:
        return self.methods[-1].estimate_prefill_flops(geometry, tokens_per_layer, tokens)

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Any) -> dict[str, Any]:
        # Pooling at stride 1 (a layer inside the stack) under Duo with every head a retrieval head.
        parts = [(name, method_class(name).conformance_settings(tmp_path, geometry)) for name in ("llavolta", "duo")]
        return {"parts": format_parts(parts)}
