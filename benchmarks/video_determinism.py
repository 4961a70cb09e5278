"""Does `write_video` give the same bytes for the same frames, and at what cost? x264 settings compared.

    python benchmarks/video_determinism.py [--seconds 30] [--size 160x120] [--fps 8] [--repeats 3]

For each x264 setting (x264's defaults at crf 18 single-threaded, and the options in
`duokit.data.video.DETERMINISTIC_X264_PARAMS`), one synthetic sample's frames (procedural haystack, a
subtitle needle) are encoded `--repeats` times in one process and once in each of three child processes
whose glibc `MALLOC_PERTURB_` differs: that variable sets what freshly allocated heap memory holds, so an
encoder that reads memory it never wrote gives different bytes across the children. Prints distinct
files, whether x264 limited to AVX2 code (`asm=AVX2`, as on a CPU without AVX-512; meaningful where this CPU has
AVX-512) writes the same bytes, seconds per video (min, median), file size, PSNR of the decoded frames against the source, and how far
the decoded frames of the first and last in-process write are apart.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from duokit.data.synth.generate import SynthConfig, Synthesizer
from duokit.data.video import DETERMINISTIC_X264_PARAMS, load_frames, write_video

SETTINGS = {"x264 defaults": "", "mbtree=0": "mbtree=0", "duokit": DETERMINISTIC_X264_PARAMS}
CHILD = ("import sys, numpy as np; from duokit.data.video import write_video; "
         "write_video(sys.argv[2], np.load(sys.argv[1]), float(sys.argv[3]), x264_params=sys.argv[4])")


def frames_of(seconds: float, size: tuple[int, int], fps: float) -> np.ndarray:
    config = SynthConfig(tasks=("ret_edit1",), per_task=1, seconds=(seconds, seconds), fps=fps, size=size, seed=0)
    return next(iter(Synthesizer(config))).frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", default="160x120", help="WxH")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    frames = frames_of(args.seconds, (width, height), args.fps)
    print(f"{len(frames)} frames {width}x{height} at {args.fps:g} fps; PyAV encode via write_video, crf 18, threads=1")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "frames.npy", frames)
        for label, params in SETTINGS.items():
            times, digests = [], []
            for i in range(args.repeats):
                start = time.perf_counter()
                path = write_video(Path(tmp) / f"in{i}.mp4", frames, args.fps, x264_params=params)
                times.append(time.perf_counter() - start)
                digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
            children = []
            for perturb in ("0", "85", "170"):
                out = Path(tmp) / f"child{perturb}.mp4"
                env = {**os.environ, "MALLOC_PERTURB_": perturb} if perturb != "0" else dict(os.environ)
                subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "frames.npy"), str(out),
                                str(args.fps), params], check=True, env=env)
                children.append(hashlib.sha256(out.read_bytes()).hexdigest())
            avx2 = write_video(Path(tmp) / "avx2.mp4", frames, args.fps, x264_params=":".join(
                filter(None, [params, "asm=AVX2"])))  # x264 limited to AVX2 code, as on a CPU without AVX-512
            same_on_avx2 = avx2.read_bytes() == path.read_bytes()
            decoded = load_frames(path, backend="pyav").frames
            first = load_frames(Path(tmp) / "in0.mp4", backend="pyav").frames
            gap = np.abs(decoded.astype(np.int16) - first)
            print(f"{label:<22} x264-params={params or '-':<10} distinct files: {len(set(digests))}/{args.repeats} "
                  f"in-process, {len(set(children))}/3 across MALLOC_PERTURB_, same bytes with asm=AVX2: {same_on_avx2}; "
                  f"s/video min {min(times):.3f} median {statistics.median(times):.3f}; "
                  f"{path.stat().st_size / 1e3:.1f} kB; PSNR {psnr(decoded, frames):.2f} dB; decoded first vs last "
                  f"write: max {gap.max()} levels, {np.mean(gap > 0):.0%} of values differ")


if __name__ == "__main__":
    main()
