"""`duokit ablate` (and `run_ablation`, its Python form for notebooks): the budget-matched comparison of
methods and controls, one `duokit eval` run directory per cell (docs/ablate.md).

DIR/ablate.json        the config as read, and each cell's spec; a re-run refuses cells whose spec changed
DIR/data/              the synthetic held-out set (data: {synth: ...}), written on first use
DIR/prepare/duo_gates/ the DuoAttention gate-training run (prepare: {duo_gates: ...})
DIR/cells/<row>/<cell>/ one `duokit eval` run directory each (config.json, predictions.jsonl, summary.json)
DIR/results.csv, results.json, results.md, plots/*.png (duokit.report)

Under `accelerate launch` with N > 1 processes the cells are dealt out whole over the ranks by predicted
cost, each run by one rank alone; the data set, the preparations and the results are made once, by the
main rank (docs/scaling.md).

A budget rho (retained visual-KV fraction) reaches a method through its own `budget_settings(rho,
geometry, tokens)`, merged over the row's settings; a token-matched baseline meets it with fewer frames
or fewer pixels per frame. The budget each cell achieved is measured from its recorded KV bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from duokit.ablate_config import AblationConfig, AblationConfigError, Cell, load_config, parse_config
from duokit.io import atomic_write_json, read_json

EXAMPLES = ("cpu", "gpu")


def example_text(name: str) -> str:
    """The shipped example config `name` (duokit/assets/ablate/<name>.yaml)."""
    if name not in EXAMPLES:
        raise AblationConfigError(f"no example {name!r}; examples: {', '.join(EXAMPLES)}")
    return resources.files("duokit").joinpath("assets", "ablate", f"{name}.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Data, preparations, the model's geometry.

def data_paths(config: AblationConfig, out: Path, progress: bool = True, make: bool = True) -> tuple[Path, Path]:
    """(annotations, videos); a synthetic set is written to DIR/data on first use (resumable: a finished
    set is recognised by its annotations file), unless `make` is false (a rank that only reads)."""
    if "synth" not in config.data:
        annotations, videos = Path(config.data["annotations"]), Path(config.data["videos"])
        if not annotations.is_file() or not videos.is_dir():
            raise FileNotFoundError(f"{config.source}: data: {annotations} or {videos} is missing; fetch VNBench "
                                    "first (`duokit data fetch`)")
        return annotations, videos
    data = out / "data"
    if not (data / "annotations.json").is_file():
        if not make:
            raise not_shared(out, data / "annotations.json")
        from duokit.data.synth.generate import Synthesizer
        from duokit.data.synth.writer import write_synth_set
        from duokit.models.needlenet.data import eval_synth_config

        synth = config.data["synth"]
        write_synth_set(Synthesizer(eval_synth_config(config.frames, synth["per_task"], synth["seed"])), data,
                        progress=progress)
    return data / "annotations.json", data / "videos"


def not_shared(out: Path, missing: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{missing} is missing on a process other than the main one, which made it: under "
                             f"`accelerate launch`, --out {out} must be on a filesystem every process sees")


def prepare(config: AblationConfig, out: Path, progress: bool = True, run: bool = True) -> dict[str, str]:
    """Run each preparation once (resumable); {name: what `@name` stands for in settings}. With `run`
    false, only the preparations already finished (a dry run trains nothing)."""
    done = {}
    for name, options in config.prepare.items():
        if name == "duo_gates":
            pattern = train_duo_gates(config, options, out / "prepare" / name, progress, run)
            if pattern is not None:
                done[name] = str(pattern)
    return done


def gate_settings(config: AblationConfig, options: dict[str, Any], progress: bool = False) -> Any:
    from duokit.methods.duo.train import TrainSettings

    defaults: dict[str, Any] = {"frames": (config.frames,), "device": config.device, "dtype": config.dtype,
                                "max_pixels": config.max_pixels, "min_pixels": config.min_pixels}
    if config.model == "needlenet":  # NeedleNet's recipe (docs/duo_training.md "Evidence on NeedleNet")
        from duokit.models.needlenet.config import FRAME_SIZE

        defaults.update(loss_positions="predicting", frame_size=(FRAME_SIZE, FRAME_SIZE))
    try:
        return TrainSettings(model=config.model, progress=progress, **{**defaults, **options})
    except TypeError as err:
        raise AblationConfigError(f"{config.source}: prepare.duo_gates: {err}; its keys are the fields of "
                                  "duokit.methods.duo.train.TrainSettings") from None


def train_duo_gates(config: AblationConfig, options: dict[str, Any], folder: Path, progress: bool,
                    run: bool = True) -> Path | None:
    """The trained pattern directory (training or resuming it first when `run`; else None if unfinished)."""
    settings = gate_settings(config, options, progress)
    pattern = folder / "pattern"
    if not ((pattern / "config.json").is_file() and read_json(pattern / "config.json").get("steps_done")
            == settings.steps):
        if not run:
            return None
        from duokit.methods.duo.train import train_gates

        train_gates(settings, folder)
    return pattern


def resolve(settings: dict[str, Any], prepared: dict[str, str]) -> dict[str, Any]:
    """`settings` with each `@name` replaced by what preparation `name` made (a pattern directory)."""
    def one(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for name, path in prepared.items():
            value = value.replace(f"@{name}", path)
        return value

    return {key: one(value) for key, value in settings.items()}


class InputShape:
    """The model's geometry and the tokens one sample's prefix has, without loading weights (the meta
    adapter): what budgets are mapped from and what each cell's preprocessing is recorded from."""

    def __init__(self, config: AblationConfig, annotations: Path, videos: Path):
        from duokit.eval_command import largest_frame_size, select_samples
        from duokit.methods.duo.train import meta_adapter
        from duokit.models import duokit_metadata, resolve_model_path

        self.config = config
        self.adapter = meta_adapter(config.model, config.max_pixels, config.min_pixels)
        fit = duokit_metadata(resolve_model_path(config.model)).get("frame_fit")  # as load_vlm reads it
        self.frame_fit = None if fit is None else tuple(fit)
        self.samples = select_samples(annotations, config.per_task, config.seed)
        if not self.samples:
            raise ValueError(f"{annotations}: no samples")
        self.frame_size = largest_frame_size(self.samples, videos)
        self.annotations, self.videos = annotations, videos
        self._seen: dict[tuple, dict] = {}

    @property
    def geometry(self) -> Any:
        return self.adapter.geometry

    def preprocessing(self, frames: int, max_pixels: int | None) -> dict[str, Any]:
        """What the processor makes of `frames` frames of the largest video at `max_pixels`: the token
        counts (`tokens`, for budget mapping) and the record a cell keeps of its input."""
        key = (frames, max_pixels)
        if key not in self._seen:
            self._seen[key] = self._preprocess(frames, max_pixels)
        return self._seen[key]

    def _preprocess(self, frames: int, max_pixels: int | None) -> dict[str, Any]:
        import numpy as np

        from duokit.data.resize import resize_frames
        from duokit.data.video import load_frames, sampled_fps
        from duokit.data.vnbench import resolve_video
        from duokit.models import DEFAULT_MAX_PIXELS
        from duokit.models.base import TokenCounts

        adapter = self.adapter
        adapter.set_pixel_limits(max_pixels or self.config.max_pixels, self.config.min_pixels)
        height, width = self.frame_size
        video_frames = np.zeros((frames, height, width, 3), dtype=np.uint8)
        if self.frame_fit is not None:
            video_frames = resize_frames(video_frames, *self.frame_fit)
        # `Adapter.build_prefix` without moving the inputs to the (meta) model's device.
        prefix_text, _ = adapter.split_prompt("?", True, None, "")
        inputs = adapter.processor(text=[prefix_text], videos=[video_frames], return_tensors="pt",
                                   add_special_tokens=False, videos_kwargs=adapter.video_kwargs(video_frames, 1.0))
        video = int((inputs["input_ids"] == adapter.video_token_id).sum())
        tokens = TokenCounts(int(inputs["input_ids"].shape[1]) - video, video, self.adapter.video_grids(inputs))
        pixels = inputs.get("pixel_values_videos")
        first = load_frames(resolve_video(self.samples[0].video_name, self.videos), num_frames=frames)
        record = {"frames": frames, "max_pixels": max_pixels or self.config.max_pixels or DEFAULT_MAX_PIXELS,
                  "min_pixels": self.config.min_pixels, "source_frame_height": height, "source_frame_width": width,
                  "fps_first_video": round(sampled_fps(first.timestamps, first.fps), 6),
                  "pixels_per_frame": None if pixels is None else int(pixels.numel() // (3 * frames)),
                  "visual_tokens_planned": video, "visual_tokens_per_frame": video / frames}
        return {"tokens": tokens, "record": record}


# ---------------------------------------------------------------------------------------------
# Cells.

def cell_name(budget: float | None, draw: tuple[str, Any] | None) -> str:
    name = "settings" if budget is None else f"rho{budget:g}"
    return name if draw is None else f"{name}-{draw[0]}{draw[1]}"


def expand(config: AblationConfig, shape: InputShape, prepared: dict[str, str]) -> list[Cell]:
    """Every cell, the reference first: budgets mapped to settings (or frames/pixels), draws expanded."""
    from duokit.methods import method_class
    from duokit.models import DEFAULT_MAX_PIXELS

    base = shape.preprocessing(config.frames, None)["tokens"]
    cells = []
    rows = sorted(config.rows, key=lambda row: row.name != config.reference)
    for row in rows:
        for budget in row.budgets or (row.budget,):
            frames, max_pixels, settings = config.frames, None, resolve(row.settings, prepared)
            if budget is not None and row.budgets:
                if row.scale == "frames":
                    frames = max(1, round(config.frames * budget))
                elif row.scale == "resolution":
                    max_pixels = max(1, round((config.max_pixels or DEFAULT_MAX_PIXELS) * budget))
                else:
                    settings = {**settings, **method_class(row.method).budget_settings(budget, shape.geometry, base)}
            draws = [None] if row.draws is None else [(row.draws[0], value) for value in row.draws[1]]
            for draw in draws:
                cells.append(Cell(row=row.name, name=cell_name(budget, draw), method=row.method,
                                  settings=settings if draw is None else {**settings, draw[0]: draw[1]},
                                  frames=frames, max_pixels=max_pixels, budget=budget,
                                  draw=None if draw is None else draw[1]))
    return cells


def check_plan(out: Path, config: AblationConfig, cells: list[Cell], raw: Any) -> None:
    """Refuse, before any cell runs, cells whose spec differs from the one DIR/ablate.json recorded for
    them (naming each cell and its differing keys); new cells may be added. Then record the plan."""
    import json

    path = out / "ablate.json"
    specs = {cell.folder: json.loads(json.dumps(cell.spec(), default=str)) for cell in cells}
    if path.is_file():
        recorded = read_json(path)
        shared = {key: (recorded.get(key), value) for key, value in (
            ("model", config.model), ("data", config.data), ("per_task", config.per_task), ("seed", config.seed))}
        changed = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in shared.items() if old != new]
        if changed:
            raise ValueError(f"{out} holds an ablation of another setup ({'; '.join(changed)}); use a new --out")
        problems = []
        for folder, spec in specs.items():
            old = recorded.get("cells", {}).get(folder)
            if old is not None and old != spec and (out / folder / "config.json").is_file():
                keys = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                problems.append(f"{folder} ({', '.join(f'{k}: {old.get(k)!r} -> {spec.get(k)!r}' for k in keys)})")
        if problems:
            raise ValueError(f"{out}: these cells already ran with other settings: {'; '.join(problems)}; delete "
                             "those cell folders to rerun them, or use a new --out")
        specs = {**recorded.get("cells", {}), **specs}
    atomic_write_json(path, {"model": config.model, "data": config.data, "per_task": config.per_task,
                             "seed": config.seed, "config": raw, "cells": specs})


def run_cell(config: AblationConfig, cell: Cell, out: Path, annotations: Path, videos: Path, world: Any) -> dict:
    """Run (or resume) `cell` whole in this process (`world`: `World.alone()` of this rank)."""
    from duokit.eval_command import run_eval

    return run_eval(annotations, videos, cell.frames, out / cell.folder, model=config.model, method=cell.method,
                    settings=cell.settings, per_task=config.per_task, seed=config.seed,
                    chunk_size=config.chunk_size, dtype=config.dtype, device=config.device,
                    max_pixels=cell.max_pixels or config.max_pixels, min_pixels=config.min_pixels,
                    decode_tries=config.decode_tries, world=world)


def cell_costs(cells: list[Cell], out: Path, shape: InputShape) -> list[float]:
    """Each cell's predicted cost, for dealing cells out over ranks: its samples not yet fully logged
    times its planned prefix tokens (the processor's count for its frames and pixels on the largest
    video, as the memory planner counts them), which drive the vision tower, the prefill and every try.
    A method's own savings are not counted (as in the dry run's time estimate). A finished cell costs 0
    (it is only scored again)."""
    from duokit.io import JsonlLog

    costs = []
    for cell in cells:
        done = JsonlLog(out / cell.folder / "predictions.jsonl", key="record_id").done
        todo = sum(any(t.record_id not in done for t in sample.tries) for sample in shape.samples)
        costs.append(float(todo * shape.preprocessing(cell.frames, cell.max_pixels)["tokens"].total))
    return costs


def my_cells(world: Any, cells: list[Cell], out: Path, shape: InputShape) -> list[Cell]:
    """This rank's cells under `split_by_cost` of `cell_costs`, in config order. The main rank reads the
    cells' logs and sends the costs to every rank (all decide from one view of DIR, before any cell runs)."""
    plan = world.broadcast([(c.folder, cost) for c, cost in zip(cells, cell_costs(cells, out, shape))]
                           if world.is_main else None)
    if [folder for folder, _ in plan] != [cell.folder for cell in cells]:
        raise ValueError(f"{out}: rank {world.rank} expands other cells than the main process; every process "
                         "must run the same duokit and config")
    return world.share(cells, [cost for _, cost in plan])


# ---------------------------------------------------------------------------------------------
# Achieved budgets and the results.

def achieved(cost: dict, reference: dict) -> dict[str, float]:
    """The budget a cell achieved, from recorded costs (means over samples) against the reference cell.

    KV: the visual share of the bytes held after the prefix — every retained byte (sinks, recent windows,
    memory and re-injected tokens included) minus what the reference spends on the same text, over the
    reference's visual bytes. Tokens: visual tokens x layers the prefill ran on, against the reference's.
    """
    text = reference["prefix_tokens"] - reference["video_tokens"]
    text_bytes = reference["kv_bytes"] * text / reference["prefix_tokens"]
    visual = reference["kv_bytes"] - text_bytes
    return {"kv": (cost["kv_bytes"] - text_bytes) / visual if visual else float("nan"),
            "tokens": (cost["visual_token_layers"] / reference["visual_token_layers"]
                       if reference["visual_token_layers"] else float("nan"))}


def cell_rows(config: AblationConfig, cells: list[Cell], out: Path, preprocessing: dict[str, dict]) -> list[dict]:
    """Report rows (duokit.report.ablation_row) of every finished cell, the reference first."""
    from duokit.report import ablation_row

    reference = read_json(out / cells[0].folder / "summary.json")["cost"]
    rows = []
    for cell in cells:
        if not (out / cell.folder / "summary.json").is_file():
            continue
        cost = read_json(out / cell.folder / "summary.json")["cost"]
        rows.append(ablation_row(out / cell.folder, cell, achieved(cost, reference),
                                 preprocessing[cell.folder]))
    return rows


def write_results(out: Path, config: AblationConfig, rows: list[dict], raw: Any) -> dict[str, Path]:
    from duokit.report import write_ablation_report

    intro = (f"Model `{config.model}`, {config.frames} frames, data {config.data}, "
             f"{rows[0]['n_samples']} samples ({config.per_task or 'all'} per sub-task, seed {config.seed}); "
             f"reference row `{config.reference}`. Budget asked: retained visual-KV fraction; achieved: measured "
             "(docs/ablate.md).")
    return write_ablation_report(out, f"duokit ablate: {config.model}", intro, rows, {"config": raw})


# ---------------------------------------------------------------------------------------------
# Running.

def plan(config: AblationConfig, out: Path, progress: bool = True, run_preparations: bool = True,
         make: bool = True) -> tuple[list[Cell], dict, InputShape]:
    """(cells, {cell folder: preprocessing record}, the input shape), data and preparations done. With
    `make` false (a rank other than the main one) nothing is written: what the main rank made is read,
    and its absence is an error."""
    annotations, videos = data_paths(config, out, progress, make)
    shape = InputShape(config, annotations, videos)
    prepared = prepare(config, out, progress, run_preparations and make)
    missing = sorted(set(config.prepare) - set(prepared))
    if missing and not make:
        raise not_shared(out, out / "prepare" / missing[0])
    cells = expand(config, shape, prepared)
    records = {cell.folder: shape.preprocessing(cell.frames, cell.max_pixels)["record"] for cell in cells}
    return cells, records, shape


def run_ablation(config: AblationConfig | str | Path | dict, out: str | Path, progress: bool = True,
                 world: Any = None) -> dict:
    """Run (or resume) every cell of `config` (an AblationConfig, a config file, or its parsed mapping)
    into `out`, then write the results; returns results.json's content.

    `world` (a `duokit.distributed.World`; default: this process's, from `accelerate launch`): with N > 1
    ranks the main rank alone makes the data set, runs the preparations and records the plan while the
    others wait at a barrier; then each rank runs its share of the cells (`my_cells`) whole, alone; after
    a second barrier the main rank writes the results, which every rank returns."""
    from duokit.distributed import current_world, log_line

    config, raw = _config(config)
    out = Path(out)
    world = current_world(cpu=config.device == "cpu") if world is None else world
    # Shared work (data set, gates, the plan) is done by the main rank alone before the others go on: the
    # gated cells of every rank need the gates, and gate training is one process anyway (docs/scaling.md).
    if world.is_main:
        for name in config.skipped:
            log_line(f"ablate: skipping optional row {name!r}: its method is not registered in this duokit")
        cells, records, shape = plan(config, out, progress)
        check_plan(out, config, cells, raw)
    world.barrier()
    if not world.is_main:
        cells, records, shape = plan(config, out, progress=False, make=False)
    mine, label = cells, ""
    if world.size > 1:
        mine, label = my_cells(world, cells, out, shape), f"rank {world.rank}/{world.size} "
        log_line(f"{label}cells: {len(mine)} of {len(cells)}: {' '.join(cell.folder for cell in mine)}")
    for number, cell in enumerate(mine, 1):
        started = time.perf_counter()
        summary = run_cell(config, cell, out, shape.annotations, shape.videos, world.alone())
        if progress:
            log_line(f"{label}[{number}/{len(mine)}] {cell.folder}: "
                     f"Overall {100 * summary['scores']['overall']:.1f}% ({time.perf_counter() - started:.1f} s)")
    world.barrier()  # every cell's summary.json is written
    if world.is_main:
        write_results(out, config, cell_rows(config, cells, out, records), raw)
    world.barrier()
    return read_json(out / "results.json")


def _config(config: AblationConfig | str | Path | dict) -> tuple[AblationConfig, Any]:
    import dataclasses
    import json

    if isinstance(config, AblationConfig):
        return config, json.loads(json.dumps(dataclasses.asdict(config), default=str))
    if isinstance(config, dict):
        return parse_config(config), config
    import yaml

    return load_config(config), yaml.safe_load(Path(config).read_text())


def dry_run(config: AblationConfig | str | Path | dict, out: str | Path, probe: bool = True) -> str:
    """The cells with their planned memory (duokit.metrics.plan_memory, per cell) and an estimated time
    from one timed sample of the reference cell (every cell assumed to cost what it costs). Writes only
    the synthetic data set and runs preparations it needs for planning."""
    from duokit.methods import get_method
    from duokit.metrics import plan_memory
    from duokit.models import load_vlm, resolve_precision

    config, _ = _config(config)
    out = Path(out)
    cells, records, shape = plan(config, out, progress=False, run_preparations=False)
    device, dtype = resolve_precision(config.model, config.dtype, config.device)
    model, _, adapter = load_vlm(config.model, dtype=dtype, device=device, max_pixels=config.max_pixels,
                                 min_pixels=config.min_pixels)
    per_sample = probe_seconds(model, adapter, cells[0], shape) if probe else None
    lines = [f"{len(cells)} cells x {len(shape.samples)} samples ({config.model}, {config.frames} frames)"]
    height, width = shape.frame_size
    for cell in cells:
        asked = "-" if cell.budget is None else f"{cell.budget:g}"
        line = f"  {cell.folder:44s} budget {asked:>5}  {records[cell.folder]['visual_tokens_planned']:>6} visual tokens"
        if any(isinstance(v, str) and "@" in v for v in cell.settings.values()):
            lines.append(f"{line}  memory planned once its preparation ran")
            continue
        adapter.set_pixel_limits(cell.max_pixels or config.max_pixels, config.min_pixels)
        memory = plan_memory(model, adapter, get_method(cell.method, **cell.settings), cell.frames, height, width,
                             chunk_size=config.chunk_size, tries=4 if config.decode_tries == "together" else 1)
        lines.append(f"{line}  KV {memory.kv_bytes / 2**20:9.3f} MiB  total {memory.total_bytes / 2**30:7.2f} GiB")
    if per_sample is not None:
        total = per_sample * len(shape.samples) * len(cells)
        lines.append(f"estimated time: {total / 60:.1f} min ({per_sample:.2f} s per sample, timed on one sample of "
                     f"{cells[0].folder}; every cell assumed as costly; cells already run are skipped; "
                     f"preparations such as gate training not included)")
    return "\n".join(lines)


def probe_seconds(model: Any, adapter: Any, cell: Cell, shape: InputShape) -> float:
    """Seconds of one sample (its 4 tries) of `cell`, the second of two runs (the first warms up)."""
    from duokit.engine import LM
    from duokit.eval_command import evaluate_sample
    from duokit.methods import get_method

    method = get_method(cell.method, **cell.settings)
    adapter.set_pixel_limits(cell.max_pixels or shape.config.max_pixels, shape.config.min_pixels)
    with method.apply(model, adapter):
        lm = LM(model, adapter)
        evaluate_sample(lm, method, shape.samples[0], shape.videos, cell.frames)
        started = time.perf_counter()
        evaluate_sample(lm, method, shape.samples[0], shape.videos, cell.frames)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The command.

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate", help="budget-matched comparison of methods and controls (resumable; docs/ablate.md)",
        description="Run every cell (row x budget x draw) of an ablation config as a `duokit eval` run under "
                    "DIR/cells/, then write DIR/results.{csv,json,md} and DIR/plots/. Re-running resumes.")
    parser.add_argument("--config", help="the ablation config (YAML)")
    parser.add_argument("--out", help="the ablation's directory")
    parser.add_argument("--example", choices=EXAMPLES, help="print a runnable example config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells, their planned memory and an estimated time; run nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from duokit.distributed import is_main_process

    try:
        if args.example:
            print(example_text(args.example), end="")
            return 0
        if not args.config or not args.out:
            raise AblationConfigError("give --config ABL.yaml and --out DIR (or --example cpu|gpu)")
        if args.dry_run:
            if is_main_process():  # under `accelerate launch` one process plans (it spreads nothing)
                print(dry_run(args.config, args.out))
            return 0
        results = run_ablation(args.config, args.out)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"duokit ablate: error: {err}", file=sys.stderr)
        return 1
    if not is_main_process():  # under `accelerate launch` the main process reports for all
        return 0
    from duokit.report import ablation_text_table

    print(ablation_text_table(results["cells"]))
    print(f"{args.out}: results.csv, results.json, results.md, plots/")
    return 0

