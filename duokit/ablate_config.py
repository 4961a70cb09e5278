"""The configuration of `duokit ablate` (docs/ablate.md): one model, one data set, rows of methods, and
the cells they expand to (rows x budgets x draws). Everything here is checked before any model loads;
a bad config is one error naming the file, the key and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of the config and of a row; anything else is refused (a typo must not silently do nothing).
TOP_KEYS = {"model": "a hub id, local directory, `needlenet` or tiny:<family>",
            "data": "{synth: {per_task, seed}} (a NeedleNet held-out set written on first use) or "
                    "{annotations: FILE, videos: DIR}",
            "frames": "frames sampled uniformly per video", "per_task": "samples per sub-task (null: all)",
            "seed": "seed of the per-task subset", "dtype": "auto | float32 | float16 | bfloat16",
            "device": "auto | cpu | cuda", "max_pixels": "pixels per frame (Qwen-VL; null: duokit's default)",
            "min_pixels": "pixels per frame small frames are resized up to", "chunk_size": "prefill chunk (tokens)",
            "decode_tries": "one_by_one (default: every cell holds one try's suffix at a time, so KV peaks and "
                            "decode times compare) | together (faster where a method batches the tries)",
            "reference": "the row whose cell is the full budget (default: the first baseline row)",
            "prepare": "{duo_gates: {steps, sink, recent, ...}}: trained once, used as `@duo_gates`",
            "rows": "the list of rows"}
ROW_KEYS = {"name": "the row's name (letters, digits, _ . -), its folder DIR/cells/<name>",
            "method": "a registered method", "settings": "the method's settings",
            "budgets": "retained visual-KV fractions rho in (0, 1], each mapped to the method's knob",
            "budget": "the budget a row of explicit settings stands for (shown as asked)",
            "scale": "frames | resolution: a token-matched baseline meets the budget with fewer frames or pixels",
            "draws": "{SETTING: [values]}: one cell per value (seeds of a random control)",
            "optional": "true: skip the row, with a note, when its method is not registered in this duokit"}
SCALES = ("frames", "resolution")
PREPARATIONS = {"duo_gates": "DuoAttention gates trained by `duokit train-duo` (duokit.methods.duo.train)"}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class AblationConfigError(ValueError):
    """A config that cannot run: the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    budgets: tuple[float, ...] = ()
    budget: float | None = None
    scale: str | None = None
    draws: tuple[str, tuple[Any, ...]] | None = None


@dataclass(frozen=True)
class Cell:
    """One `duokit eval` run: DIR/cells/<row>/<name>."""

    row: str
    name: str
    method: str
    settings: dict[str, Any]
    frames: int
    max_pixels: int | None
    budget: float | None  # asked
    draw: Any = None

    @property
    def folder(self) -> str:
        return f"cells/{self.row}/{self.name}"

    def spec(self) -> dict[str, Any]:
        """What decides this cell's predictions before a model is seen (compared on a re-run)."""
        return {"method": self.method, "settings": self.settings, "frames": self.frames,
                "max_pixels": self.max_pixels, "budget": self.budget}


@dataclass(frozen=True)
class AblationConfig:
    model: str
    data: dict[str, Any]
    frames: int
    rows: tuple[Row, ...]
    per_task: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    max_pixels: int | None = None
    min_pixels: int | None = None
    chunk_size: int | None = None
    decode_tries: str = "one_by_one"
    reference: str = ""
    prepare: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # optional rows whose method is not registered
    source: str = "config"

    @property
    def reference_row(self) -> Row:
        return next(row for row in self.rows if row.name == self.reference)


def load_config(path: str | Path) -> AblationConfig:
    """Read and check an ablation config (YAML or JSON)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AblationConfigError(f"{path}: no such config file; `duokit ablate --example cpu > ABL.yaml` writes one")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AblationConfigError(f"{path}: not valid YAML ({err})") from None
    return parse_config(raw, str(path))


def parse_config(raw: Any, source: str = "config") -> AblationConfig:
    from duokit.methods import discover_methods

    def fail(where: str, problem: str) -> AblationConfigError:
        return AblationConfigError(f"{source}: {where}: {problem}")

    if not isinstance(raw, dict):
        raise fail("top level", "expected a mapping of keys (model, data, frames, rows, ...)")
    _known(raw, TOP_KEYS, "top level", fail)
    for key in ("model", "data", "frames", "rows"):
        if key not in raw:
            raise fail(key, f"missing; it is {TOP_KEYS[key]}")
    if not isinstance(raw["model"], str):
        raise fail("model", f"expected {TOP_KEYS['model']}, got {raw['model']!r}")
    frames = _integer(raw["frames"], "frames", fail)
    per_task = None if raw.get("per_task") is None else _integer(raw["per_task"], "per_task", fail)
    data = _data(raw["data"], fail)
    prepare = raw.get("prepare") or {}
    if not isinstance(prepare, dict) or any(not isinstance(v, dict) for v in prepare.values()):
        raise fail("prepare", f"expected {TOP_KEYS['prepare']}, got {prepare!r}")
    for name in prepare:
        if name not in PREPARATIONS:
            raise fail(f"prepare.{name}", f"unknown preparation; known: {', '.join(PREPARATIONS)}")
    if not isinstance(raw["rows"], list) or not raw["rows"]:
        raise fail("rows", "expected a non-empty list of rows")
    methods = discover_methods()
    rows, skipped = [], []
    for index, entry in enumerate(raw["rows"]):
        where = f"rows[{index}]"
        if not isinstance(entry, dict):
            raise fail(where, f"expected a mapping with {', '.join(ROW_KEYS)}, got {entry!r}")
        where = f"rows[{index}] ({entry.get('name', '?')})"
        _known(entry, ROW_KEYS, where, fail)
        if entry.get("method") not in methods:
            if entry.get("optional"):
                skipped.append(str(entry.get("name")))
                continue
            raise fail(f"{where}.method", f"{entry.get('method')!r} is not a registered method of this duokit; "
                       f"known: {', '.join(sorted(methods))} (mark the row `optional: true` to skip it where absent)")
        rows.append(_row(entry, where, fail, prepare))
    names = [row.name for row in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise fail("rows", f"row names must be unique; repeated: {', '.join(duplicates)}")
    reference = raw.get("reference") or next((r.name for r in rows if r.method == "baseline" and not r.budgets), None)
    if reference not in names:
        raise fail("reference", f"{reference!r} is not a row; name the full-budget row (a baseline row without "
                   "budgets) that achieved budgets are measured against")
    ref_row = rows[names.index(reference)]
    if ref_row.budgets or len(ref_row.draws[1] if ref_row.draws else (0,)) > 1:
        raise fail("reference", f"row {reference!r} has several cells; the reference must be one cell")
    config = AblationConfig(
        model=raw["model"], data=data, frames=frames, rows=tuple(rows), per_task=per_task,
        seed=_integer(raw.get("seed", 0), "seed", fail, minimum=0), dtype=str(raw.get("dtype", "auto")),
        device=str(raw.get("device", "auto")), max_pixels=_optional_int(raw, "max_pixels", fail),
        min_pixels=_optional_int(raw, "min_pixels", fail), chunk_size=_optional_int(raw, "chunk_size", fail),
        decode_tries=_decode_tries(raw, fail), reference=reference, prepare=prepare, skipped=tuple(skipped), source=source)
    for row in rows:  # the settings each cell will get are checked now, not after hours of other cells
        check_row_settings(row, fail)
    return config


def _decode_tries(raw: dict, fail) -> str:
    from duokit.eval_command import DECODE_TRIES

    value = raw.get("decode_tries", "one_by_one")
    if value not in DECODE_TRIES:
        raise fail("decode_tries", f"must be one of {', '.join(DECODE_TRIES)}, got {value!r}")
    return value


def _known(mapping: dict, keys: dict, where: str, fail) -> None:
    unknown = sorted(set(mapping) - set(keys))
    if unknown:
        raise fail(where, f"unknown key {', '.join(map(repr, unknown))}; known: "
                   + "; ".join(f"{k} ({v})" for k, v in keys.items()))


def _integer(value: Any, where: str, fail, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(where, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _optional_int(raw: dict, key: str, fail) -> int | None:
    return None if raw.get(key) is None else _integer(raw[key], key, fail)


def _data(data: Any, fail) -> dict[str, Any]:
    if isinstance(data, dict) and set(data) == {"synth"} and isinstance(data["synth"], dict):
        synth = data["synth"]
        unknown = sorted(set(synth) - {"per_task", "seed"})
        if unknown:
            raise fail("data.synth", f"unknown key {', '.join(map(repr, unknown))}; known: per_task, seed")
        return {"synth": {"per_task": _integer(synth.get("per_task", 4), "data.synth.per_task", fail),
                          "seed": _integer(synth.get("seed", 1), "data.synth.seed", fail, minimum=0)}}
    if isinstance(data, dict) and set(data) == {"annotations", "videos"}:
        return {"annotations": str(data["annotations"]), "videos": str(data["videos"])}
    raise fail("data", f"expected {TOP_KEYS['data']}, got {data!r}")


def _budget(value: Any, where: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1 or math.isnan(value):
        raise fail(where, f"a budget is a retained visual-KV fraction in (0, 1], got {value!r}")
    return float(value)


def _row(entry: dict, where: str, fail, prepare: dict) -> Row:
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise fail(f"{where}.name", f"expected {ROW_KEYS['name']}, got {name!r}")
    settings = entry.get("settings") or {}
    if not isinstance(settings, dict):
        raise fail(f"{where}.settings", f"expected a mapping of the method's settings, got {settings!r}")
    for key, value in settings.items():
        for used in re.findall(r"@(\w+)", value if isinstance(value, str) else ""):
            if used not in prepare:
                raise fail(f"{where}.settings.{key}", f"uses @{used}, which the config's `prepare` does not "
                           f"define; add `prepare: {{{used}: {{...}}}}` or give a path")
    budgets = entry.get("budgets") or []
    if not isinstance(budgets, list):
        raise fail(f"{where}.budgets", f"expected a list of budgets, got {budgets!r}")
    budgets = tuple(_budget(b, f"{where}.budgets", fail) for b in budgets)
    budget = entry.get("budget")
    if budget is not None:
        budget = _budget(budget, f"{where}.budget", fail)
        if budgets:
            raise fail(f"{where}.budget", "give `budgets` (mapped to settings) or `budget` (explicit settings), "
                       "not both")
    scale = entry.get("scale")
    if scale is not None:
        if scale not in SCALES:
            raise fail(f"{where}.scale", f"expected one of {', '.join(SCALES)}, got {scale!r}")
        if entry["method"] != "baseline" or not budgets:
            raise fail(f"{where}.scale", "a token-matched row is method `baseline` with `budgets`")
    draws = entry.get("draws")
    if draws is not None:
        if not (isinstance(draws, dict) and len(draws) == 1 and isinstance(next(iter(draws.values())), list)
                and next(iter(draws.values()))):
            raise fail(f"{where}.draws", f"expected {{SETTING: [value, ...]}}, got {draws!r}")
        key, values = next(iter(draws.items()))
        draws = (key, tuple(values))
    return Row(name=name, method=entry["method"], settings=settings, budgets=budgets, budget=budget, scale=scale,
               draws=draws)


def check_row_settings(row: Row, fail) -> None:
    """The row's own settings (and each draw) are valid for its method, and a budgeted row's method has a
    budget knob. Settings that need a preparation (`@name`) are checked for their keys only."""
    from duokit.methods import method_class
    from duokit.methods.base import coerce_settings

    cls = method_class(row.method)
    where = f"rows ({row.name})"
    values = [dict(row.settings)]
    if row.draws:
        values = [{**row.settings, row.draws[0]: value} for value in row.draws[1]]
    for settings in values:
        try:
            coerce_settings(cls, settings)
            if not any(isinstance(v, str) and "@" in v for v in settings.values()):
                cls(**coerce_settings(cls, settings))
        except (ValueError, TypeError) as err:
            raise fail(f"{where}.settings", str(err)) from None
    if row.budgets and not row.scale and "budget_settings" not in _defines(cls):
        raise fail(f"{where}.budgets", f"method {row.method!r} has no budget knob (`budget_settings`); give its "
                   "settings explicitly with `budget: RHO` instead")


def _defines(cls: type) -> set[str]:
    from duokit.methods.base import Method

    return {name for klass in cls.__mro__ if klass is not Method for name in vars(klass)}


def standard_config(model: str, data: dict[str, Any], frames: int, per_task: int | None, budgets: list[float],
                    methods: list[str], pattern: str, sink: int, recent: int, llavolta_layer: int = 2,
                    controls: bool = True, optional: bool = False, prepare: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """The comparison notebook 04 runs, as a config mapping: the baseline, each of `methods` at `budgets`
    (duo with `pattern` — a directory or "@duo_gates" — and the window sink + recent; llavolta pooling at
    `llavolta_layer`, K = 2 as LLaVolta's heavy setting), llavolta + duo
    composed, and with `controls` the token-matched baselines, random dropping and each method's random
    variant. `optional` marks the method rows optional (skipped where a method is not registered)."""
    duo = {"pattern": pattern, "sink": sink, "recent": recent}
    own = {"duo": duo, "llavolta": {"layer": llavolta_layer}}
    random_variants = {"duo": ("duo_random_heads", duo, {"random_heads": [0, 1, 2]}),
                       "flex": ("flex_random", {"selection": "random"}, {"seed": [0, 1]}),
                       "llamb": ("llamb_uniform", {"segmentation": "uniform"}, None)}
    extra = {"optional": True} if optional else {}
    rows: list[dict[str, Any]] = [{"name": "baseline", "method": "baseline"}]
    for method in methods:
        rows.append({"name": method, "method": method, "settings": own.get(method, {}),
                     "budgets": list(budgets), **extra})
    if {"duo", "llavolta"} <= set(methods):
        parts = (f"llavolta(layer={llavolta_layer},stride=2) + "
                 f"duo(pattern={pattern},sparsity=0.5,sink={sink},recent={recent})")
        rows.append({"name": "llavolta_duo", "method": "compose", "settings": {"parts": parts}})
    if controls:
        rows.append({"name": "fewer_frames", "method": "baseline", "scale": "frames", "budgets": list(budgets)})
        if model != "needlenet":  # NeedleNet fits every frame to 56x56: fewer pixels would change nothing
            rows.append({"name": "lower_resolution", "method": "baseline", "scale": "resolution",
                         "budgets": list(budgets)})
        rows.append({"name": "random_drop", "method": "random_drop", "budgets": list(budgets)})
        for method in methods:
            if method in random_variants:
                name, settings, draws = random_variants[method]
                rows.append({"name": name, "method": method, "settings": settings, "budgets": list(budgets[:1]),
                             **({"draws": draws} if draws else {}), **extra})
    return {"model": model, "data": data, "frames": frames, "per_task": per_task, **top,
            **({"prepare": prepare} if prepare else {}), "rows": rows}
