"""The method protocol and the registry (the kvpress idea on transformers' public extension points).

A method is a small dataclass of settings. The engine applies it to a loaded model for the duration
of a run (`with method.apply(model, adapter): ...`) and asks it, per sample, for a fresh KV cache.
Within `apply` a method may select an attention function registered with `AttentionInterface` for
the language model only; it never replaces a module's `forward`. At its identity setting every
method reproduces the baseline's tokens exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **settings: Any) -> Method:
    _import_builtin_methods()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name](**settings)


def _import_builtin_methods() -> None:
    # Importing a method module registers it; kept lazy so `duokit.methods` imports without torch.
    import duokit.methods.baseline
    import duokit.methods.duo.method  # noqa: F401


@dataclass
class Method:
    """Base class: the baseline behaviour (dense attention, the model's own cache)."""

    name: ClassVar[str] = ""

    @contextlib.contextmanager
    def apply(self, model: Any, adapter: Any) -> Iterator[None]:
        """Prepare `model` for this method and undo it on exit. The base method changes nothing."""
        yield

    def new_cache(self, model: Any, adapter: Any) -> Any:
        """A fresh KV cache for one sample, or None for the model's default `DynamicCache`.

        The engine prefills the shared video prefix into it once and gives each try a
        `copy.deepcopy` of that prefilled cache, so a cache must survive deepcopy.
        """
        return None

    def prepare_prefix(self, prefix: Any, model: Any, adapter: Any) -> Any:
        """The shared prefix the engine prefills, possibly transformed by the method.

        `prefix` is a `duokit.models.Prefix` (embeddings, position ids, video-token mask, the position
        of the next text token). A method that pools or drops video tokens returns a new one, keeping
        the kept tokens' original position ids and `next_position`. The base method returns it as is.
        """
        return prefix

    def estimate_kv_bytes(self, num_layers: int, num_kv_heads: int, head_dim: int,
                          num_tokens: int, dtype_bytes: int) -> int:
        """KV-cache bytes this method holds for `num_tokens` tokens (keys and values, every layer).

        The memory planner uses it before a run; tests compare it with the bytes a cache really holds.
        """
        return 2 * num_layers * num_kv_heads * head_dim * num_tokens * dtype_bytes

    def settings(self) -> dict[str, Any]:
        """The settings recorded in a run's config.json."""
        return {"name": self.name, **asdict(self)}
