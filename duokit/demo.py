"""`duokit demo`: the whole pipeline on CPU with the shipped NeedleNet, in one resumable run directory.

Stages (docs/demo.md): synthesize a fresh held-out set → evaluate every method of `DEMO_ROWS` (a method
may first prepare something, e.g. DuoAttention trains its gates) → a table of accuracy, KV-cache
memory and latency, printed and saved with plots.

RUN/demo.json        the demo's settings (+ the model's hash); a re-run must match them
RUN/data/            the held-out set: videos/*.mp4, annotations.json, manifest.json (as `duokit synth`)
RUN/eval/<method>/   one `duokit eval` run directory per method
RUN/duo-train/       the DuoAttention gate-training run (`duokit train-duo`)
RUN/stages.json      wall seconds of each stage when it last ran
RUN/results.md, RUN/results.json, RUN/plots/*.png
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from duokit.io import atomic_write_json, atomic_write_text, iter_jsonl, read_json
from duokit.methods.duo.train import OFFICIAL_STEPS
from duokit.plots import new_figure, save_png

MODEL = "needlenet"
# The held-out set's seed is the demo seed + 1 (the gates train on seed `seed`), as in
# benchmarks/duo_training_evidence.py; its split "eval" keeps it disjoint from every training set anyway.
HELDOUT_SEED_OFFSET = 1
MIB = 2**20


@dataclass(frozen=True)
class DemoConfig:
    frames: int = 32
    per_task: int = 16  # 144 samples: one sample is 0.7 points of the 4-try Overall
    # The official step count (duoattention.md §5): the whole default demo takes 113 s on 2 CPU cores,
    # 79 s of it gate training (docs/demo.md), well inside the 10 minutes.
    gate_steps: int = OFFICIAL_STEPS
    sparsity: float = 0.5
    # NeedleNet's context is ~70 tokens (64 video tokens at 32 frames), so the paper's 64/256 window
    # would hold everything; 4 + 16 is the window of docs/duo_training.md "Evidence on NeedleNet".
    sink: int = 4
    recent: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        # Every stage's own checks, before any work: the held-out set, the gate training, the duo method.
        import numpy as np

        from duokit.methods.duo.pattern import binarize
        from duokit.models.needlenet.data import eval_synth_config

        eval_synth_config(self.frames, self.per_task, self.heldout_seed)
        train_settings(self, progress=False)
        binarize(np.zeros((1, 1)), self.sparsity)

    @property
    def heldout_seed(self) -> int:
        return self.seed + HELDOUT_SEED_OFFSET


@dataclass(frozen=True)
class Preparation:
    """A stage a method needs before its evaluation (e.g. training DuoAttention gates)."""

    title: str
    done: Callable[[DemoConfig, Path], bool]
    run: Callable[[DemoConfig, Path, bool], Any]  # (config, run directory, progress)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the demo: a `duokit eval` method and its settings, with an optional preparation."""

    name: str  # its run directory, RUN/eval/<name>
    label: str  # table and plot label
    method: str  # registered method name (duokit.methods)
    settings: Callable[[DemoConfig, Path], dict[str, Any]]
    prepare: Preparation | None = None


def train_settings(config: DemoConfig, progress: bool):
    from duokit.methods.duo.train import TrainSettings
    from duokit.models.needlenet.config import FRAME_SIZE

    # The evidence benchmark's recipe (docs/duo_training.md "Evidence on NeedleNet"): NeedleNet's own task
    # family (train-duo picks it for NeedleNet), the loss where its one-word answers are predicted.
    return TrainSettings(model=MODEL, steps=config.gate_steps, sink=config.sink, recent=config.recent,
                         loss_positions="predicting", seed=config.seed, frames=(config.frames,),
                         frame_size=(FRAME_SIZE, FRAME_SIZE), device="cpu", dtype="float32", progress=progress)


def train_duo_gates(config: DemoConfig, run: Path, progress: bool) -> None:
    from duokit.methods.duo.train import train_gates

    train_gates(train_settings(config, progress), run / "duo-train")


def gates_done(config: DemoConfig, run: Path) -> bool:
    path = run / "duo-train" / "pattern" / "config.json"
    return path.is_file() and read_json(path).get("steps_done") == config.gate_steps


def duo_settings(config: DemoConfig, run: Path) -> dict[str, Any]:
    # Training and inference give `recent` one meaning (docs/duoattention.md): deploy the trained window.
    return {"pattern": str(run / "duo-train" / "pattern"), "sparsity": config.sparsity, "sink": config.sink,
            "recent": config.recent}


# The demo grows by appending a spec here.
DEMO_ROWS = (
    MethodSpec("baseline", "baseline (dense)", "baseline", lambda config, run: {}),
    MethodSpec("duo", "DuoAttention", "duo", duo_settings,
               prepare=Preparation("training DuoAttention gates", gates_done, train_duo_gates)),
)


def model_sha256() -> str:
    from duokit.models import resolve_model_path

    return hashlib.sha256((Path(resolve_model_path(MODEL)) / "model.safetensors").read_bytes()).hexdigest()


def check_run(run: Path, config: DemoConfig) -> dict:
    """RUN/demo.json's content, after refusing a run directory that holds a demo with other settings."""
    wanted = {"model": MODEL, "model_sha256": model_sha256(), **asdict(config)}
    path = run / "demo.json"
    if path.exists():
        saved = read_json(path)
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ValueError(f"{run} holds a demo run with other settings ({details}); re-run with the same "
                             "settings to resume, or use a new --out")
    else:
        atomic_write_json(path, wanted)
    return wanted


def synthesize(config: DemoConfig, data: Path, progress: bool) -> None:
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.synth.writer import write_synth_set
    from duokit.models.needlenet.data import eval_synth_config

    synth = eval_synth_config(config.frames, config.per_task, config.heldout_seed)
    write_synth_set(Synthesizer(synth), data, progress=progress)


def evaluate(config: DemoConfig, run: Path, spec: MethodSpec) -> dict:
    from duokit.eval_command import run_eval

    data = run / "data"
    return run_eval(data / "annotations.json", data / "videos", config.frames, run / "eval" / spec.name, model=MODEL,
                    method=spec.method, settings=spec.settings(config, run), dtype="float32", device="cpu")


def streaming_share(config: DemoConfig, run: Path, spec: MethodSpec) -> float:
    """Fraction of KV heads that keep only sink + recent tokens (0 for methods without streaming heads)."""
    from duokit.methods import get_method

    retrieval = getattr(get_method(spec.method, **spec.settings(config, run)), "retrieval", None)
    return 0.0 if retrieval is None else float(1.0 - retrieval.mean())


def median_peak_growth(eval_dir: Path) -> float:
    """Median over samples of the memory a sample added at its peak. Not the run's max: the first sample
    of a process pays one-off allocations, which would favour whichever method runs later."""
    import numpy as np

    growth = {r["sample_id"]: r["cost"]["peak_memory_growth_bytes"] for r in iter_jsonl(eval_dir / "predictions.jsonl")
              if r.get("cost")}
    return float(np.median(list(growth.values())))


def result_row(config: DemoConfig, run: Path, spec: MethodSpec) -> dict:
    summary = read_json(run / "eval" / spec.name / "summary.json")
    scores, cost = summary["scores"], summary["cost"]
    return {
        "method": spec.name, "label": spec.label, "settings": spec.settings(config, run),
        "streaming_heads": streaming_share(config, run, spec),
        "overall": scores["overall"], "overall_1try": scores["overall_1try"],
        "families": scores["families"],
        "subtasks": {name: s["accuracy"] for name, s in scores["subtasks"].items()},
        "n_samples": scores["n_samples"], "n_unparsed": scores["n_unparsed"],
        "kv_bytes": cost["kv_bytes"], "peak_memory_bytes": cost["peak_memory_bytes_max"],
        "peak_growth_bytes_median": median_peak_growth(run / "eval" / spec.name),
        "peak_memory_exact": cost["peak_memory_exact"], "prefill_s": cost["prefill_s"],
        "decode_s_per_token": cost["decode_s_per_token"], "prefix_tokens": cost["prefix_tokens"],
    }


COLUMNS = ("method", "streaming %", "Overall 4-try %", "1-try %", "retrieval %", "ordering %", "counting %",
           "KV cache MiB", "peak +MiB", "prefill s", "decode ms/token")


def table_cells(row: dict) -> list[str]:
    families = row["families"]
    return [row["label"], f"{100 * row['streaming_heads']:.0f}", f"{100 * row['overall']:.1f}",
            f"{100 * row['overall_1try']:.1f}",
            *(f"{100 * families[f]:.1f}" for f in ("ret", "ord", "cnt")),
            f"{row['kv_bytes'] / MIB:.4f}", f"{row['peak_growth_bytes_median'] / MIB:.2f}", f"{row['prefill_s']:.4f}",
            f"{1000 * row['decode_s_per_token']:.2f}"]


def text_table(rows: list[dict]) -> str:
    lines = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def markdown(config: dict, rows: list[dict]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(table_cells(row)) + " |\n" for row in rows)
    n = rows[0]["n_samples"]
    return (f"# duokit demo\n\nModel `{config['model']}` (sha256 {config['model_sha256'][:12]}…), {config['frames']} "
            f"frames, {n} held-out samples ({config['per_task']} per sub-task), {config['gate_steps']} gate-training "
            f"steps (window sink {config['sink']} + recent {config['recent']}). Accuracy: VNBench 4-try "
            "circular (all 4 option orders right) and 1-try; KV cache: bytes held after the prefix (mean per "
            "sample); peak +: memory a sample added at its peak over what was in use at its start (median over "
            "samples; weights excluded; RSS on CPU, allocated memory on CUDA); latency: mean per sample.\n\n"
            + header + body + "\n![per sub-task](plots/accuracy_subtasks.png)\n"
            "![accuracy vs KV cache](plots/accuracy_kv.png)\n![latency](plots/latency.png)\n")


# ---------------------------------------------------------------------------------------------
# Plots (duokit.plots: Agg canvas, no display needed, written atomically).

def plot_subtasks(rows: list[dict], path: Path) -> Path:
    import numpy as np

    from duokit.data.vnbench import PAPER_LABELS, SUBTASKS

    figure = new_figure(9, 3.5)
    axes = figure.add_subplot()
    x, width = np.arange(len(SUBTASKS)), 0.8 / len(rows)
    for k, row in enumerate(rows):
        axes.bar(x + (k - (len(rows) - 1) / 2) * width, [100 * row["subtasks"].get(t, 0.0) for t in SUBTASKS],
                 width, label=row["label"])
    axes.set_xticks(x, [PAPER_LABELS[t] for t in SUBTASKS])
    axes.set_ylabel("4-try accuracy %")
    axes.set_ylim(0, 100)
    axes.legend()
    axes.set_title("Accuracy per sub-task")
    return save_png(figure, path)


def plot_accuracy_kv(rows: list[dict], path: Path) -> Path:
    figure = new_figure(5, 3.5)
    axes = figure.add_subplot()
    for row in rows:
        x, y = row["kv_bytes"] / MIB, 100 * row["overall"]
        axes.scatter([x], [y])
        axes.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("KV cache MiB (per sample)")
    axes.set_ylabel("Overall 4-try accuracy %")
    axes.set_xlim(0, 1.3 * max(row["kv_bytes"] for row in rows) / MIB)  # room for the labels
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy vs KV-cache memory")
    return save_png(figure, path)


def plot_latency(rows: list[dict], path: Path) -> Path:
    figure = new_figure(8, 3)
    labels = [row["label"] for row in rows]
    for k, (key, scale, unit) in enumerate((("prefill_s", 1.0, "prefill s"), ("decode_s_per_token", 1000.0,
                                                                              "decode ms/token"))):
        axes = figure.add_subplot(1, 2, k + 1)
        axes.bar(labels, [scale * row[key] for row in rows], color=[f"C{i}" for i in range(len(rows))])
        axes.set_ylabel(unit)
    figure.suptitle("Latency (mean per sample)")
    return save_png(figure, path)


def report(run: Path, config: dict, demo: DemoConfig) -> tuple[str, dict]:
    rows = [result_row(demo, run, spec) for spec in DEMO_ROWS]
    results = {"config": config, "methods": rows}
    stages = run / "stages.json"
    if stages.exists():
        results["stage_seconds"] = read_json(stages)
    atomic_write_json(run / "results.json", results)
    atomic_write_text(run / "results.md", markdown(config, rows))
    for plot, name in ((plot_subtasks, "accuracy_subtasks"), (plot_accuracy_kv, "accuracy_kv"),
                       (plot_latency, "latency")):
        plot(rows, run / "plots" / f"{name}.png")
    return text_table(rows), results


# ---------------------------------------------------------------------------------------------
# The pipeline.

@dataclass(frozen=True)
class Stage:
    key: str  # its entry in RUN/stages.json
    title: str
    done: Callable[[], bool]
    run: Callable[[], Any]


def run_demo(out: str | Path | None = None, frames: int = 32, per_task: int = 16,
             gate_steps: int = OFFICIAL_STEPS, sparsity: float = 0.5, sink: int = 4, recent: int = 16,
             seed: int = 0, progress: bool = True) -> dict:
    """Run (or resume) the demo into `out` (default: `default_run_root() / "demo"`); returns RUN/results.json.

    Finished stages are skipped and interrupted ones resume (synthesis restarts, evaluations and gate
    training continue); a different configuration into the same `out` raises ValueError.
    """
    from duokit.data.vnbench import SUBTASKS
    from duokit.runtime import default_run_root

    demo = DemoConfig(frames, per_task, gate_steps, sparsity, sink, recent, seed)
    # Absolute, as `duokit eval` records paths: the duo run stores its pattern directory.
    run = (Path(out) if out is not None else default_run_root() / "demo").expanduser().resolve()
    config = check_run(run, demo)
    data = run / "data"
    samples = len(SUBTASKS) * per_task
    stages = [Stage("synth", f"synthesizing {samples} held-out samples ({frames} frames) into {data}",
                    lambda: (data / "annotations.json").is_file(), lambda: synthesize(demo, data, progress))]
    for spec in DEMO_ROWS:
        if spec.prepare is not None:
            prepare = spec.prepare
            stages.append(Stage(f"prepare-{spec.name}", prepare.title, lambda p=prepare: p.done(demo, run),
                                lambda p=prepare: p.run(demo, run, progress)))
        stages.append(Stage(f"eval-{spec.name}", f"evaluating {spec.label} on {samples} samples",
                            lambda spec=spec: (run / "eval" / spec.name / "summary.json").is_file(),
                            lambda spec=spec: evaluate(demo, run, spec)))
    timings_path = run / "stages.json"
    timings = read_json(timings_path) if timings_path.exists() else {}
    total = len(stages) + 1
    for number, stage in enumerate(stages, start=1):
        if stage.done():
            print(f"[{number}/{total}] {stage.title}: done before, skipped", flush=True)
            continue
        print(f"[{number}/{total}] {stage.title} …", flush=True)
        start = time.perf_counter()
        stage.run()
        timings[stage.key] = round(time.perf_counter() - start, 2)
        atomic_write_json(timings_path, timings)
        print(f"      {timings[stage.key]:.1f} s", flush=True)
    print(f"[{total}/{total}] writing the table and plots to {run}", flush=True)
    table, results = report(run, config, demo)
    print(table, flush=True)
    return results


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on CPU with NeedleNet: held-out set, baseline, DuoAttention, table + plots",
        description="Synthesize a held-out set, evaluate the dense baseline, train DuoAttention gates, evaluate "
                    "DuoAttention, and print/save a table (accuracy, KV memory, latency) with plots. "
                    "Re-running the same command resumes (docs/demo.md).")
    parser.add_argument("--out", default=None, help="run directory (default: RUN_ROOT/demo, RUN_ROOT = "
                                                    "MyDrive/duokit on Colab with Drive, else ./runs)")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled per video (default 32)")
    parser.add_argument("--per-task", type=int, default=16, help="held-out samples per sub-task (default 16)")
    parser.add_argument("--gate-steps", type=int, default=OFFICIAL_STEPS,
                        help=f"DuoAttention gate-training steps (default {OFFICIAL_STEPS})")
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of KV heads made streaming (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="gate-training seed; the held-out set uses seed + 1")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        run_demo(args.out, frames=args.frames, per_task=args.per_task, gate_steps=args.gate_steps,
                 sparsity=args.sparsity, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"duokit demo: error: {err}", file=sys.stderr)
        return 1
    return 0
