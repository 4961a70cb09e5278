"""The method protocol and the registry (the kvpress idea on transformers' public extension points).

A method is a small dataclass of settings, registered by name. The engine applies it to a loaded model
for the duration of a run (`with method.apply(model, adapter): ...`) and, per sample, calls its hooks
in this order (docs/architecture.md, "The method protocol"):

    prefix = method.prepare_prefix(prefix, sample, lm)     # the embedded prefix; may keep/pool/insert tokens
    cache  = method.new_cache(lm, prefix)                   # a fresh KV cache (default: preallocated)
    cache  = method.prefill(lm, prefix, cache, chunk_size)  # default: lm.prefill, fixed chunks
    restore = method.prefix_restorer(cache)                 # default: the cache's own, else deepcopy
    ... per try: restore(), the try's suffix, greedy decoding through lm.forward

Within `apply` (override `install`) a method may select an attention function for the language model
only (`duokit.methods.attention.select_attention`) or add forward pre-hooks; it never replaces a
module's `forward`. At its identity setting (`conformance_settings`) every method reproduces the
baseline's tokens and logits exactly; tests/test_method_conformance.py checks that, and more, for every
registered method.

Registration: a module `duokit/methods/<name>.py`, or a package `duokit/methods/<name>/` with a
`method.py`, whose class is decorated with `@register_method`; `discover_methods` finds it (no list
to edit).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: the engine and models import torch, kept out of `import duokit.methods`
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

    from duokit.engine import LM, SampleInput
    from duokit.models.base import Adapter, Geometry, Prefix, TokenCounts

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    METHODS[cls.name] = cls
    return cls


def discover_methods() -> dict[str, type[Method]]:
    """Import every method module under `duokit.methods` (which registers its classes); the registry.

    Kept lazy (torch is imported by the method modules) so `import duokit.methods` stays light.
    """
    import duokit.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{module.name}"
        if not module.ispkg:
            importlib.import_module(name)
        elif (Path(package.__path__[0]) / module.name / "method.py").is_file():
            importlib.import_module(f"{name}.method")
    return METHODS


def method_class(name: str) -> type[Method]:
    methods = discover_methods()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]


def get_method(name: str, **settings: Any) -> Method:
    """`METHODS[name](**settings)`, with settings given as text (the CLI's `--set KEY=VALUE`) typed
    from the method's dataclass fields; an unknown key or a bad value is one clear error."""
    cls = method_class(name)
    return cls(**coerce_settings(cls, settings))


def setting_fields(cls: type[Method]) -> dict[str, Any]:
    """{field name: its type} of a method's settings."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _describe(cls: type[Method]) -> str:
    def one(name: str, kind: Any) -> str:
        default = next(f.default for f in fields(cls) if f.name == name)
        shown = "required" if default is MISSING else f"default {default!r}"
        return f"{name} ({_type_name(kind)}, {shown})"

    return ", ".join(one(name, kind) for name, kind in setting_fields(cls).items()) or "none"


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(kind))
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(text: str, kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(kind):
            try:
                return _convert(text, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if kind is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise ValueError(f"{text!r} is not none")
    if kind is bool:
        if text.lower() not in BOOLEANS:
            raise ValueError(f"{text!r} is not a bool (true/false)")
        return BOOLEANS[text.lower()]
    if kind in (int, float, str):
        return kind(text)
    raise ValueError(f"settings of type {_type_name(kind)} cannot be given as text")


def coerce_settings(cls: type[Method], settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` with text values converted to their field's type; values of other types pass as given."""
    known = setting_fields(cls)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"method {cls.name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
                         f"{_describe(cls)}")
    typed = {}
    for key, value in settings.items():
        if isinstance(value, str) and known[key] is not str:
            try:
                value = _convert(value, known[key])
            except ValueError as err:
                raise ValueError(f"method {cls.name!r}: setting {key}={value!r} is not a valid "
                                 f"{_type_name(known[key])} ({err}); its settings: {_describe(cls)}") from None
        typed[key] = value
    return typed


@dataclass
class Method:
    """Base class: the baseline behaviour (dense attention, the model's own cache, the engine's prefill)."""

    name: ClassVar[str] = ""
    # True when the prefix the method prefills depends on the question: the engine then builds and
    # prefills one prefix per distinct question (prefix = system turn + video + the tries' shared
    # question part) and passes the question to `prepare_prefix`; otherwise the question is "".
    prefix_depends_on_question: ClassVar[bool] = False
    # Keys `settings()` adds that are not dataclass fields (derived facts, e.g. a file's hash).
    derived_settings: ClassVar[tuple[str, ...]] = ()
    # True when the engine may decode a prefix's tries as one batch over the shared prefix KV
    # (`duokit.decode_together`): the method's cache layers hold every KV head of every token as
    # `keys`/`values` and its decode attention is the model's own. Tokens are equal; logits equal up to
    # rounding, so with `keep_logits` the engine decodes the tries one by one.
    decodes_tries_together: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "apply" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: override `install`, not `apply` (apply records that it ran)")

    # --- run scope ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def apply(self, model: PreTrainedModel, adapter: Adapter) -> Iterator[None]:
        """Prepare `model` for this method (`install`) for the duration of the block, then undo it."""
        if getattr(self, "_applied_to", None) is not None:
            raise RuntimeError(f"method {self.name!r} is already applied")
        with self.install(model, adapter):
            self._applied_to = id(model)  # not the model itself: a copy of the method must not copy it
            try:
                yield
            finally:
                self._applied_to = None

    def install(self, model: PreTrainedModel, adapter: Adapter) -> contextlib.AbstractContextManager:
        """What `apply` does to the model (a context manager that undoes it). The base changes nothing."""
        return contextlib.nullcontext()

    def check_applied(self, model: PreTrainedModel) -> None:
        """Raise unless this method is applied to `model` (the engine calls it before every sample)."""
        if getattr(self, "_applied_to", None) != id(model):
            raise RuntimeError(f"method {self.name!r} must run inside `with method.apply(model, adapter):`")

    # --- per sample --------------------------------------------------------------------------------
    def prepare_prefix(self, prefix: Prefix, sample: SampleInput, lm: LM) -> Prefix:
        """The prefix the engine prefills: `prefix` (a `duokit.models.Prefix`), possibly transformed
        (`prefix.keep(mask)` drops tokens with every parallel array; `dataclasses.replace` swaps
        embeddings or positions). `sample` (`duokit.engine.SampleInput`) has the frames, fps, text
        context and, for a method with `prefix_depends_on_question`, the question; `lm` the model."""
        return prefix

    def new_cache(self, lm: LM, prefix: Prefix | None) -> Cache:
        """A fresh KV cache for one sample (it may carry per-sample state derived from `prefix`).

        The default allocates each layer once for the prefix plus `lm.decode_reserve` tokens (the
        longest try suffix + `max_new_tokens`, set by the engine) and appends in place
        (`duokit.methods.preallocated`). A cache must survive deepcopy; tensors that are not KV belong
        elsewhere (`kv_cache_bytes` counts every tensor attribute of a cache layer)."""
        from duokit.methods.preallocated import preallocated_cache

        return preallocated_cache(lm.adapter.text_config, 0 if prefix is None else prefix.num_tokens, lm.decode_reserve)

    def prefix_restorer(self, cache: Cache) -> Callable[[], Cache]:
        """Called once after the prefill: a callable that returns a cache in the prefilled state, once
        per try. The default uses the cache's own `prefix_restorer()` when it has one (in place, in
        O(suffix) time and memory: `PreallocatedCache`, `DuoCache`), else gives each try a deepcopy.
        A method whose cache deep-copies must say so in `estimate_restore_kv_bytes`."""
        own = getattr(cache, "prefix_restorer", None)
        if own is not None:
            return own()
        return lambda: copy.deepcopy(cache)

    def prefill(self, lm: LM, prefix: Prefix, cache: Cache, chunk_size: int) -> Cache:
        """Fill `cache` with `prefix`. The default is the engine's chunked prefill; a method may give its
        own chunk ends and per-chunk extra inputs: `lm.prefill(prefix, cache, chunk_size, bounds=[...],
        chunk_kwargs=lambda start, end: {...})`, or run several passes through `lm.forward`."""
        return lm.prefill(prefix, cache, chunk_size)

    # --- costs -------------------------------------------------------------------------------------
    def estimate_kv_bytes(self, geometry: Geometry, tokens: TokenCounts) -> int:
        """KV bytes this method's cache holds at its peak over prefilling (and decoding) `tokens`
        (`duokit.models.TokenCounts`: text and video tokens as the adapter built them, the video grids)
        on a model of `geometry`. The planner uses it before a run; the engine records it next to the
        measured peak, and the conformance suite requires the two to be equal.

        Two halves, so that methods acting at different places compose (`compose`): which tokens each
        layer keeps (`layer_tokens`), and what a layer holding that many tokens costs (`kv_bytes_of_layers`)."""
        return self.kv_bytes_of_layers(geometry, self.layer_tokens(geometry, tokens))

    def layer_tokens(self, geometry: Geometry, tokens: TokenCounts) -> list[int]:
        """Tokens layer l's cache holds at the peak (for every KV head). The baseline: all of them, everywhere."""
        return [tokens.total] * geometry.num_layers

    def kv_bytes_of_layers(self, geometry: Geometry, per_layer: Sequence[int]) -> int:
        """Bytes of K and V when layer l holds `per_layer[l]` tokens in each of its KV heads."""
        return 2 * geometry.num_kv_heads * geometry.head_dim * geometry.dtype_bytes * sum(per_layer)

    def estimate_sample_kv_bytes(self, geometry: Geometry, tokens: TokenCounts, prefix: Prefix) -> int:
        """The peak KV bytes of one sample whose prepared prefix is `prefix` (what the engine records as
        planned). Default: `estimate_kv_bytes`; a method whose peak depends on the content of the prefix
        (where a segmentation put its boundaries, how many tokens a selection re-injected) overrides it."""
        return self.estimate_kv_bytes(geometry, tokens)

    def estimate_restore_kv_bytes(self, geometry: Geometry, prefix_tokens: TokenCounts, reserve: int = 0) -> int:
        """KV bytes held besides the cache to give each try the prefilled state (the planner adds them),
        for tries of up to `reserve` tokens (longest suffix + `max_new_tokens`; 0: unknown).
        The default: 0 with the default cache (restored in place by truncation); for a method with its
        own cache, a copy of the prefix (the deepcopy fallback keeps the original beside each try's
        copy). A method whose own cache restores itself overrides this."""
        if type(self).new_cache is Method.new_cache:
            return 0
        return self.estimate_kv_bytes(geometry, prefix_tokens)

    def estimate_prefill_flops(self, geometry: Geometry, tokens_per_layer: Sequence[int],
                               tokens: TokenCounts | None = None) -> dict[str, int]:
        """Analytic FLOPs of the prefill, given how many tokens each layer ran on (measured by the
        engine) and the prefill's `TokenCounts` (`tokens`, for methods whose attention pattern depends
        on the video layout): `attention_flops` (q/k/v/o projections + causal scores and weighted
        values) and `mlp_flops` (gated MLP: 3 matrices). A multiply-add counts 2."""
        attention = mlp = 0
        for count in tokens_per_layer:
            attention += projection_flops(geometry, count) + score_flops(geometry.num_heads, geometry.head_dim,
                                                                         causal_pairs(count))
            mlp += 2 * 3 * count * geometry.hidden_size * geometry.intermediate_size
        return {"attention_flops": attention, "mlp_flops": mlp}

    # --- budgets -----------------------------------------------------------------------------------
    @classmethod
    def budget_settings(cls, budget: float, geometry: Geometry, tokens: TokenCounts) -> dict[str, Any]:
        """Settings (merged over a row's own) at which this method keeps about `budget` (0 < ρ <= 1) of
        the visual KV of a sample of `tokens` on a model of `geometry` — the ablation's budget matching
        (docs/ablate.md). The achieved budget is measured, not taken from here."""
        raise NotImplementedError(f"method {cls.name!r} has no budget knob; give its settings explicitly")

    # --- settings ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings recorded in a run's config.json."""
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Method:
        """The method a run's config.json records (`settings()` read back)."""
        if settings.get("name") != cls.name:
            raise ValueError(f"settings of method {settings.get('name')!r} given to {cls.name!r}")
        own = {key: value for key, value in settings.items() if key != "name" and key not in cls.derived_settings}
        method = cls(**coerce_settings(cls, own))
        if method.settings() != dict(settings):
            raise ValueError(f"{cls.name}: the recorded settings {dict(settings)} do not describe this method "
                             f"(it records {method.settings()})")
        return method

    @classmethod
    def conformance_settings(cls, tmp_path: Path, geometry: Geometry) -> dict[str, Any]:
        """Settings at which the method must reproduce the baseline exactly on a model of `geometry`
        (its identity), creating any file they need under `tmp_path`; used by the conformance suite."""
        return {}


def causal_pairs(tokens: int) -> int:
    """(query, key) pairs of causal attention over `tokens` tokens."""
    return tokens * (tokens + 1) // 2


def score_flops(num_heads: int, head_dim: int, pairs: int) -> int:
    """q·k and the weighted sum of v, per query head, per (query, key) pair."""
    return 2 * 2 * num_heads * head_dim * pairs


def projection_flops(geometry: Geometry, tokens: int) -> int:
    """q, k, v and o projections of `tokens` tokens."""
    q_and_o = 2 * geometry.num_heads * geometry.head_dim
    k_and_v = 2 * geometry.num_kv_heads * geometry.head_dim
    return 2 * tokens * geometry.hidden_size * (q_and_o + k_and_v)
