"""Wall time of `duokit eval` in one process vs sharded over N processes with `accelerate launch`.

A synthetic VNBench-schema set (random-frame videos, 4 tries per sample) is evaluated from scratch into a
fresh run directory per run, the configurations alternating so that load drift hits both; every sharded
run is checked to give the single-process records (timings aside). Wall time includes each process's
start (torch import, model load), as a user waits for it.
Run: `python benchmarks/sharded_eval.py [--samples 32] [--frames 8] [--processes 1,2] [--repeats 3]
[--threads T]`. N > 1 uses `accelerate launch --multi_gpu --num_processes N` (torchrun; gloo on CPU, see
docs/scaling.md), which gives each process 1 CPU thread by default while a plain process takes one per
core: `--threads T` gives every process of both T threads, to compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("ret_edit1", "cnt_insert1", "ord_edit1", "cnt_edit1")
OPTIONS = ["Alice", "Bob", "Carol", "Dave"]


def write_set(root: Path, samples: int, size: int) -> tuple[Path, Path]:
    from duokit.data.video import write_video
    from duokit.data.vnbench import LETTERS, permuted_options

    videos = root / "videos"
    videos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for index in range(samples):
        name = f"h{index}_{TASKS[index % len(TASKS)]}"
        write_video(videos / f"{name}.mp4", rng.integers(0, 256, (20, size, size, 3), dtype=np.uint8), fps=10.0)
        gt = OPTIONS[index % 4]
        for try_index, options in enumerate(permuted_options(OPTIONS)):
            records.append({"video": f"./VNBench/{name}.mp4", "question": "What is the secret word?",
                            "options": options, "gt": gt, "gt_option": LETTERS[options.index(gt)],
                            "type": name.split("_", 1)[1], "try": try_index, "needle_time": [0.5], "length": 2.0})
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(records))
    return annotations, videos


def command(processes: int, eval_args: list[str], threads: int | None) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "duokit", *eval_args]
    per_process = [] if threads is None else ["--num_cpu_threads_per_process", str(threads)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *per_process, "-m", "duokit", *eval_args]


def time_launches(root: Path, counts: list[int], repeats: int, threads: int | None,
                  outcome: Callable[[Path], Any], duokit_args: Callable[[Path], list[str]],
                  prepare: Callable[[Path], None] = lambda run: None) -> dict[int, list[float]]:
    """Wall seconds of `duokit ARGS` (`duokit_args(run)`) launched with each process count in `counts`,
    interleaved over `repeats` so machine load hits them alike; every run's `outcome(run)` must equal the
    first's (the sharded result is the single-process one)."""
    walls: dict[int, list[float]] = {n: [] for n in counts}
    env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    reference = None
    for repeat in range(repeats):
        for n in counts:
            run = root / f"run-{n}-{repeat}"
            prepare(run)
            started = time.perf_counter()
            subprocess.run(command(n, duokit_args(run), threads), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env)
            walls[n].append(time.perf_counter() - started)
            reference = reference or outcome(run)
            if outcome(run) != reference:
                raise SystemExit(f"{n} processes gave another result than the first run")
            print(f"repeat {repeat}: {n} process(es) {walls[n][-1]:.1f} s", flush=True)
    return walls


def answers(run: Path) -> list[tuple]:
    lines = (run / "predictions.jsonl").read_text().splitlines()
    return [(r["record_id"], r["raw_output"], r["correct"]) for r in map(json.loads, lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:qwen2_5_vl")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="frame height and width in pixels")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every process")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]

    root = Path(tempfile.mkdtemp(prefix="sharded-eval-"))
    try:
        annotations, videos = write_set(root, args.samples, args.size)
        walls = time_launches(root, counts, args.repeats, args.threads, answers, lambda run: [
            "eval", "--model", args.model, "--annotations", str(annotations), "--videos", str(videos),
            "--frames", str(args.frames), "--out", str(run), "--device", args.device])
        print(f"\n{args.samples} samples x 4 tries, {args.model}, {args.frames} frames of {args.size} px, "
              f"device {args.device}, {os.cpu_count()} CPUs, threads per process: "
              f"{args.threads or 'launcher default (plain: one per core; accelerate: 1)'}")
        base = min(walls[counts[0]])
        for n in counts:
            best, median = min(walls[n]), statistics.median(walls[n])
            print(f"{n} process(es): min {best:.1f} s, median {median:.1f} s, "
                  f"{3600 * args.samples / best:.0f} samples/hour, speed-up {base / best:.2f}x vs {counts[0]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
