"""`duokit synth`: write a VNBench-style synthetic set (videos, annotations.json, manifest.json)."""

from __future__ import annotations

import argparse
import sys

from duokit.data.vnbench import SUBTASKS


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x240 (WxH), got {text!r}") from None
    return width, height


def _seconds(text: str) -> tuple[float, float]:
    try:
        parts = [float(part) for part in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number or a range MIN-MAX, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"seconds must be a number or a range MIN-MAX, got {text!r}")
    return parts[0], parts[-1]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="generate VNBench-style needle videos (procedural or from your own haystack videos)",
        description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (videos/, annotations.json, manifest.json)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--haystacks", help="folder of haystack videos (default: procedural haystacks)")
    source.add_argument("--procedural", action="store_true", help="draw haystacks in code (the default)")
    parser.add_argument("--per-task", type=int, default=None,
                        help="haystacks, each used once per sub-task (default: 10 procedural, or every "
                             "video of the folder's split)")
    parser.add_argument("--tasks", nargs="+", default=list(SUBTASKS), choices=SUBTASKS, metavar="TASK",
                        help=f"sub-tasks (default: all 9: {' '.join(SUBTASKS)})")
    parser.add_argument("--seconds", type=_seconds, default=(30.0, 30.0),
                        help="procedural haystack length, N or MIN-MAX; a cap for user videos (default 30)")
    parser.add_argument("--fps", type=float, default=8.0, help="output frame rate (default 8)")
    parser.add_argument("--size", type=_size, default=(320, 240), help="frame size WxH (default 320x240)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--needle-seconds", type=float, default=1.5, help="needle duration (default 1.5)")
    parser.add_argument("--needle-images", help="folder with one sub-folder of images per class "
                                                "(default: procedural icons)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="seed namespace and file split; train and eval never share haystacks or needles")
    parser.set_defaults(func=run)


def run(args) -> int:
    from duokit.data.synth.generate import SynthConfig, Synthesizer
    from duokit.data.synth.writer import write_synth_set

    per_task = args.per_task if args.per_task is not None or args.haystacks else 10
    try:
        config = SynthConfig(tasks=tuple(args.tasks), per_task=per_task, seconds=args.seconds, fps=args.fps,
                             size=args.size, seed=args.seed, needle_seconds=args.needle_seconds,
                             split=args.split, haystacks=args.haystacks, needle_images=args.needle_images)
        path = write_synth_set(Synthesizer(config), args.out)
    except (ValueError, FileNotFoundError) as err:  # bad folders, videos or settings: one line, no traceback
        print(f"duokit synth: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {len(config.tasks)} sub-task videos per haystack under {args.out}/videos")
    return 0
