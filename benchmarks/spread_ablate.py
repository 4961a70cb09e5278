"""Wall time of `duokit ablate` in one process vs its cells spread over N processes with `accelerate launch`.

A NeedleNet ablation (9 synthetic samples per cell by default, no preparations, so that only the spread
part is timed) runs from scratch into a fresh directory per run, the configurations alternating so that
load drift hits both. The synthetic set is written once and copied into every run (the ablation finds
it made), so every run reads the same videos; every spread run is checked to give the single-process
results.csv (measured columns aside). Wall time includes each process's start (torch import, model load).
Run: `python benchmarks/spread_ablate.py [--per-task 1] [--processes 1,2] [--repeats 3] [--threads T]`
(N > 1: `accelerate launch --multi_gpu --num_processes N`, gloo on CPU; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml
from sharded_eval import time_launches

# results.csv columns measured by the clock or the process (they differ between any two runs).
MEASURED = {"prefill_s", "decode_s_per_token", "peak_growth_bytes_median"}


def config(per_task: int) -> dict:
    return {"model": "needlenet", "data": {"synth": {"per_task": per_task, "seed": 7}}, "frames": 32,
            "dtype": "float32", "device": "cpu",
            "rows": [{"name": "baseline", "method": "baseline"},
                     {"name": "random_drop", "method": "random_drop", "budgets": [0.5, 0.25]},
                     {"name": "llavolta", "method": "llavolta", "budgets": [0.5, 0.25]},
                     {"name": "fewer_frames", "method": "baseline", "scale": "frames", "budgets": [0.5]}]}


def results(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in csv.DictReader((run / "results.csv").open())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=1, help="synthetic samples per sub-task (9 sub-tasks)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every process")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]

    root = Path(tempfile.mkdtemp(prefix="spread-ablate-"))
    try:
        spec = config(args.per_task)
        path = root / "ablate.yaml"
        path.write_text(yaml.safe_dump(spec))
        from duokit import ablate
        from duokit.ablate_config import parse_config

        template = root / "template"  # the data set, written once
        cells = len(ablate.plan(parse_config(spec), template, progress=False)[0])
        walls = time_launches(root, counts, args.repeats, args.threads, results,
                              lambda run: ["ablate", "--config", str(path), "--out", str(run)],
                              prepare=lambda run: shutil.copytree(template / "data", run / "data"))
        print(f"\n{cells} cells x {9 * args.per_task} samples, needlenet, 32 frames, CPU, {os.cpu_count()} CPUs, "
              f"threads per process: {args.threads or 'launcher default (plain: one per core; accelerate: 1)'}")
        base = min(walls[counts[0]])
        for n in counts:
            best, median = min(walls[n]), statistics.median(walls[n])
            print(f"{n} process(es): min {best:.1f} s, median {median:.1f} s, speed-up {base / best:.2f}x vs {counts[0]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
