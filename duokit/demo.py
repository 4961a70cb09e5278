"""`duokit demo`: the whole pipeline on CPU with the shipped NeedleNet, in one resumable run directory.

Stages (docs/demo.md): synthesize a fresh held-out set → evaluate every method of `DEMO_ROWS` (a method
may first prepare something, e.g. DuoAttention trains its gates) → a table of accuracy, KV-cache
memory and latency, printed and saved with plots (duokit.report, shared with the notebooks).

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

from duokit.io import atomic_write_json, read_json
from duokit.methods.duo.train import OFFICIAL_STEPS

MODEL = "needlenet"
# The held-out set's seed is the demo seed + 1 (the gates train on seed `seed`), as in
# benchmarks/duo_training_evidence.py; its split "eval" keeps it disjoint from every training set anyway.
HELDOUT_SEED_OFFSET = 1


@dataclass(frozen=True)
class DemoConfig:
    # 64 frames: NeedleNet's prefix is 133 tokens, so the 4 + 16 window is 15% of it (docs/demo.md).
    frames: int = 64
    per_task: int = 16  # 144 samples: one sample is 0.7 points of the 4-try Overall
    # The official step count (scripts/train.sh of https://github.com/mit-han-lab/duo-attention): the whole
    # default demo took 6.1 min on a busy 2-core machine, 4.4 min of it gate training (docs/demo.md).
    gate_steps: int = OFFICIAL_STEPS
    sparsity: float = 0.5
    # NeedleNet's context is ~130 tokens (128 video tokens at 64 frames), so the paper's 64/256 window
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


def result_row(config: DemoConfig, run: Path, spec: MethodSpec) -> dict:
    from duokit.report import eval_row

    return eval_row(run / "eval" / spec.name, spec.label, streaming_share(config, run, spec),
                    spec.settings(config, run))


def intro(config: dict, rows: list[dict]) -> str:
    from duokit.report import COLUMNS_NOTE

    return (f"Model `{config['model']}` (sha256 {config['model_sha256'][:12]}…), {config['frames']} frames, "
            f"{rows[0]['n_samples']} held-out samples ({config['per_task']} per sub-task), {config['gate_steps']} "
            f"gate-training steps (window sink {config['sink']} + recent {config['recent']}). {COLUMNS_NOTE}")


def report(run: Path, config: dict, demo: DemoConfig) -> tuple[str, dict]:
    """RUN/results.md, RUN/results.json and RUN/plots/ through duokit.report; returns the printed table."""
    from duokit.report import text_table, write_report

    rows = [result_row(demo, run, spec) for spec in DEMO_ROWS]
    extra = {"config": config}
    stages = run / "stages.json"
    if stages.exists():
        extra["stage_seconds"] = read_json(stages)
    write_report(run, "duokit demo", intro(config, rows), rows, extra)
    return text_table(rows), read_json(run / "results.json")


# ---------------------------------------------------------------------------------------------
# The pipeline.

@dataclass(frozen=True)
class Stage:
    key: str  # its entry in RUN/stages.json
    title: str
    done: Callable[[], bool]
    run: Callable[[], Any]


def run_demo(out: str | Path | None = None, frames: int = 64, per_task: int = 16,
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
    parser.add_argument("--out", default=None, help="run directory (default: ROOT/runs/demo, ROOT = "
                                                    "MyDrive/duokit on Colab, else $DUOKIT_ROOT or .)")
    parser.add_argument("--frames", type=int, default=64, help="frames sampled per video (default 64)")
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
