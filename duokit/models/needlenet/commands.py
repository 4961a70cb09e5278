"""`duokit needlenet train`: retrain NeedleNet from scratch (docs/needlenet.md).

Options left out keep the TrainSettings defaults (duokit/models/needlenet/config.py), which are the
settings of the shipped model; nothing under duokit.models is imported until the command runs, so
`duokit --help` stays free of torch.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("needlenet", help="NeedleNet, the tiny trained video VLM shipped with duokit",
                                   description="NeedleNet: train the tiny Qwen2.5-VL from scratch on synthetic "
                                               "needle videos (CPU, resumable).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train from scratch into --out (re-run the same command to resume)")
    train.add_argument("--out", required=True, help="run directory (the model ends up in OUT/model)")
    train.add_argument("--seed", type=int, help="model init and data seed (default 0)")
    train.add_argument("--heads", type=int, help="query heads per language-model layer (default 4)")
    train.add_argument("--kv-heads", type=int,
                       help="KV heads per layer, a divisor of --heads (default 2); more give DuoAttention more to choose")
    train.add_argument("--init-vision", help="a trained NeedleNet model folder whose vision tower and word "
                                              "embeddings start the run (default: random init)")
    train.add_argument("--init", help="a trained NeedleNet model folder (same --heads/--kv-heads) whose every "
                                       "weight starts the run")
    train.add_argument("--recognition-batch-size", type=int, help="two-frame groups per recognition step (default 128)")
    train.add_argument("--recognition-first-size-share", type=float,
                       help="share of the recognition steps drawn at the first --recognition-sizes size alone "
                            "(default 0.333)")
    train.add_argument("--recognition-frozen-embeddings", dest="recognition_embeddings", action="store_false",
                       default=None, help="recognition trains the vision tower alone, against the word embeddings "
                                          "as they are (default: the embeddings learn too)")
    train.add_argument("--recognition-teacher", action="store_true", default=None,
                       help="with --init: the vision tower learns the init tower's tokens for the same group at 56x56 "
                            "(teaches --recognition-sizes without changing what the language model reads)")
    train.add_argument("--recognition-steps", type=int,
                       help="vision-tower recognition pre-training steps before the video QA steps (default 2000)")
    train.add_argument("--recognition-lr", type=float, help="peak learning rate of the recognition steps (default 3e-3)")
    train.add_argument("--steps", type=int, help="video QA optimizer steps, 0 = recognition only (default 8000)")
    train.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    train.add_argument("--curriculum", help="frames per stage, comma-separated (default 2,4,8,16,32)")
    train.add_argument("--family-weights",
                       help="draws of each retrieval,ordering,counting sub-task relative to the others (default 1,3,2)")
    train.add_argument("--sizes", help="frame sizes WxH the video QA videos are synthesized at, comma-separated, "
                                        "a repeat weights a size; frames are resized to 56x56 (default 56x56)")
    train.add_argument("--recognition-sizes",
                       help="frame sizes WxH the recognition needles are drawn at, comma-separated; the first alone "
                            "for the first third of the recognition steps (default 56x56)")
    train.add_argument("--stride", help="MIN-MAX video frames (2 fps) between sampled frames (default 1.5-3)")
    train.add_argument("--threads", type=int, help="torch threads of the training process (default 1)")
    train.add_argument("--workers", type=int, help="data worker processes, 0 = none (default 1)")
    train.add_argument("--no-mix-stages", dest="mix_stages", action="store_false", default=None,
                       help="train each curriculum stage alone (default: every other step revisits an earlier one)")
    train.set_defaults(func=run_train)
    export = actions.add_parser("export", help="write OUT/model from the last checkpoint of a stopped run")
    export.add_argument("--out", required=True, help="run directory of `duokit needlenet train`")
    export.set_defaults(func=run_export)


def run_train(args: argparse.Namespace) -> int:
    from duokit.models.needlenet.config import TrainSettings
    from duokit.models.needlenet.train import train

    keys = ("seed", "init_vision", "init", "heads", "kv_heads", "recognition_steps", "recognition_lr",
            "recognition_batch_size", "recognition_first_size_share", "recognition_embeddings", "recognition_teacher", "steps", "batch_size", "threads", "workers", "mix_stages")
    given = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    try:
        if args.curriculum is not None:
            given["curriculum"] = tuple(int(frames) for frames in args.curriculum.split(","))
        for key in ("sizes", "recognition_sizes"):
            if getattr(args, key) is not None:
                given[key] = tuple(size.strip() for size in getattr(args, key).split(","))
        if args.stride is not None:
            given["stride"] = tuple(float(value) for value in args.stride.split("-"))
        if args.family_weights is not None:
            given["family_weights"] = tuple(int(weight) for weight in args.family_weights.split(","))
        result = train(TrainSettings(**given), args.out)
    except ValueError as err:
        print(f"duokit needlenet train: error: {err}", file=sys.stderr)
        return 1
    stage = f"last stage {result['frames']} frames" if result["step"] else "recognition only"
    print(f"{args.out}/model: {result['step']} steps, {stage}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from duokit.models.needlenet.train import export_checkpoint

    try:
        path = export_checkpoint(args.out)
    except ValueError as err:
        print(f"duokit needlenet export: error: {err}", file=sys.stderr)
        return 1
    print(f"{path}: exported from the last checkpoint")
    return 0
