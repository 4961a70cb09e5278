"""Synthesizer throughput for 64-frame 224x224 clips: in memory, and with H.264 encoding included.

    python benchmarks/synth_speed.py [--haystacks 3]

Prints samples per second for (1) VNBench-style samples of all nine sub-tasks in memory, (2) the same
with each video encoded to mp4 (write_video: single-threaded x264, no B-frames), (3) the training variant in memory,
with a fresh haystack per sample and with a warm pool of reused haystacks.
Haystacks are 16 s at 4 fps = 64 frames; insert sub-tasks add their needle frames on top.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from duokit.data.synth.generate import SynthConfig, Synthesizer
from duokit.data.synth.training import TrainingConfig, TrainingGenerator
from duokit.data.video import write_video


def rate(label: str, count: int, seconds: float) -> None:
    print(f"{label:<52} {count / seconds:8.2f} samples/s  ({count} samples in {seconds:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haystacks", type=int, default=3, help="haystacks (x 9 sub-tasks) per measurement")
    args = parser.parse_args()
    config = SynthConfig(per_task=args.haystacks, seconds=(16.0, 16.0), fps=4.0, size=(224, 224), seed=0)

    start = time.perf_counter()
    samples = list(Synthesizer(config))
    rate("VNBench-style, in memory", len(samples), time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        for sample in Synthesizer(config):
            write_video(Path(out) / f"{sample.sample_id}.mp4", sample.frames, sample.fps)
        rate("VNBench-style, encoded to mp4", len(samples), time.perf_counter() - start)

    count = 9 * args.haystacks
    for label, pool in (("fresh haystack each", None), (f"pool of {args.haystacks} haystacks", args.haystacks)):
        training = TrainingGenerator(TrainingConfig(frame_counts=(64,), fps=4.0, size=(224, 224), haystack_pool=pool))
        if pool:
            for _ in training.samples(4 * pool, start=count):  # warm the pool: it is drawn once per run
                pass
        start = time.perf_counter()
        for _ in training.samples(count):
            pass
        rate(f"training variant, in memory, {label}", count, time.perf_counter() - start)


if __name__ == "__main__":
    main()
