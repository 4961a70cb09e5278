"""`duokit train-duo --model M --out RUN [...]`: train DuoAttention gates (docs/duo_training.md).

Re-running the same command resumes from RUN/ckpt/latest.pt. `--profile N` instead writes a
training-free pattern from attention profiling on N synthetic examples (NOT DuoAttention).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from duokit.methods.duo.train import (
    GATE_DTYPE_NAMES,
    OFFICIAL_BLOCK_SIZE,
    OFFICIAL_LR,
    OFFICIAL_REG_WEIGHT,
    OFFICIAL_SAVE_EVERY,
    OFFICIAL_STEPS,
    STREAMING_MASKS,
    TRAIN_RECENT,
    TRAIN_SINK,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train-duo", help="train DuoAttention gates on a frozen (video) LM",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id, local directory or tiny:<family>")
    parser.add_argument("--out", required=True, help="run directory (on Drive in Colab); re-run to resume")
    parser.add_argument("--steps", type=int, default=OFFICIAL_STEPS, help=f"default {OFFICIAL_STEPS} (official)")
    parser.add_argument("--save-every", type=int, default=OFFICIAL_SAVE_EVERY,
                        help=f"checkpoint every K steps (default {OFFICIAL_SAVE_EVERY}, official)")
    parser.add_argument("--lr", type=float, default=OFFICIAL_LR, help=f"AdamW lr (default {OFFICIAL_LR})")
    parser.add_argument("--reg", type=float, default=OFFICIAL_REG_WEIGHT,
                        help=f"L1 weight λ on mean |gate| (default {OFFICIAL_REG_WEIGHT})")
    parser.add_argument("--sink", type=int, default=TRAIN_SINK, help=f"training sink tokens (default {TRAIN_SINK})")
    parser.add_argument("--recent", type=int, default=TRAIN_RECENT,
                        help=f"training recent tokens (default {TRAIN_RECENT})")
    parser.add_argument("--variant", choices=("paper", "official-teacher"), default="paper",
                        help="full-attention term of the mix: the student's own (paper, default) or the teacher's "
                             "(the official code)")
    parser.add_argument("--streaming-mask", choices=STREAMING_MASKS, default="token",
                        help="streaming window in training: the exact token window of inference (token, default) "
                             "or the official default's block-sparse pattern (blocksparse: ceil(sink/B) sink blocks "
                             "and ceil(recent/B) local blocks of --block-size tokens)")
    parser.add_argument("--block-size", type=int, default=OFFICIAL_BLOCK_SIZE,
                        help=f"blocksparse block size in tokens (default {OFFICIAL_BLOCK_SIZE}, the official kernel's)")
    parser.add_argument("--gate-dtype", choices=GATE_DTYPE_NAMES, default="float32",
                        help="gate (and AdamW state) precision: float32 (default) or bfloat16, the official "
                             "code's (gates in the model dtype)")
    parser.add_argument("--loss-positions", choices=("answer", "predicting"), default="answer",
                        help="hidden states in the loss: at the answer tokens (official, default) or at the "
                             "positions predicting them (better for one-token answers)")
    parser.add_argument("--seed", type=int, default=0)
    video = parser.add_argument_group("video data (synthesizer training variant; VLMs)")
    video.add_argument("--frames", type=int, nargs="+", default=[32, 64, 128], help="grid of frame counts")
    video.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                       help="synthetic frame size (default 448 252 for real VLMs: 72 tokens/frame on Qwen2.5-VL; "
                            "64 64 for tiny models and NeedleNet)")
    video.add_argument("--max-pixels", type=int, default=None,
                       help="pixels per frame the processor resizes frames down to (Qwen-VL; default 448x448 or "
                            "the model's own cap if lower; docs/video.md)")
    video.add_argument("--min-pixels", type=int, default=None,
                       help="pixels per frame small frames are resized up to (default: the model's own)")
    video.add_argument("--fps", type=float, default=2.0)
    video.add_argument("--needles", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"))
    text = parser.add_argument_group("text data (official multi-passkey recipe; text LMs)")
    text.add_argument("--text-file", help="any long local plain-text file used as the haystack")
    text.add_argument("--context-min", type=int, default=1000)
    text.add_argument("--context-max", type=int, default=32000)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute decoder layers in backward (default: on for CUDA, off on CPU)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on sm80+, fp16 on T4, fp32 on CPU) or a name")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--plan", action="store_true",
                        help="print the estimated GPU memory of a training step at the largest --frames (reads the "
                             "model's config and processor only) and exit")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="training-free fallback: score heads by attention profiling on N synthetic examples "
                             "(NOT DuoAttention) and write RUN/pattern")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from duokit.methods.duo.train import TrainSettings

    return TrainSettings(
        model=args.model, steps=args.steps, save_every=args.save_every, lr=args.lr, reg_weight=args.reg,
        sink=args.sink, recent=args.recent, variant=args.variant, streaming_mask=args.streaming_mask,
        block_size=args.block_size, gate_dtype=args.gate_dtype, loss_positions=args.loss_positions,
        seed=args.seed, frames=tuple(args.frames),
        frame_size=None if args.frame_size is None else tuple(args.frame_size), max_pixels=args.max_pixels,
        min_pixels=args.min_pixels, fps=args.fps, needles=tuple(args.needles), text_file=args.text_file,
        context_min=args.context_min, context_max=args.context_max,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=args.device,
        progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        if args.plan:
            print(memory_plan_line(settings))
            return 0
        if args.profile is not None:
            return run_profile(settings, Path(args.out), args.profile)
        import torch

        from duokit.methods.duo.train import train_gates

        if torch.cuda.is_available() and settings.device in ("auto", "cuda"):
            print(memory_plan_line(settings))

        summary = train_gates(settings, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"duokit train-duo: error: {err}", file=sys.stderr)
        return 1
    print(f"gates after {summary['steps']} steps: mean {summary['gate_mean']:.3f}, min {summary['gate_min']:.3f}, "
          f"{summary['below_half']:.1%} below 0.5; pattern in {Path(args.out) / 'pattern'}")
    return 0


def memory_plan_line(settings) -> str:
    """The estimated memory of one step at the largest --frames (bf16), against this machine's GPU."""
    import torch

    from duokit.methods.duo.train import PASSKEY_QA_TOKENS, TEXT_TOKENS, plan_for_model

    checkpointing = settings.gradient_checkpointing is not False
    available = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    text_tokens = settings.context_max + PASSKEY_QA_TOKENS if settings.text_file else TEXT_TOKENS
    plan = plan_for_model(settings.model, max(settings.frames), settings.frame_size, dtype_bytes=2,
                          checkpointing=checkpointing, available_bytes=available, text_tokens=text_tokens,
                          max_pixels=settings.max_pixels, min_pixels=settings.min_pixels, kernel="efficient")
    state = "no GPU here" if available is None else ("fits" if plan.fits else
                                                     "does NOT fit: fewer --frames, a smaller --frame-size or "
                                                     "--gradient-checkpointing")
    return (f"train-duo memory plan (bf16, gradient checkpointing {'on' if checkpointing else 'off'}): "
            f"{plan.describe()} -> {state}")


def run_profile(settings, out: Path, num_examples: int) -> int:
    from duokit.methods.duo.checkpoint import CHECKPOINT_FILE
    from duokit.methods.duo.pattern import save_pattern
    from duokit.methods.duo.profile import METHOD_LABEL, profile_heads
    from duokit.methods.duo.train import make_data
    from duokit.methods.duo.train_plots import plot_gates_heatmap
    from duokit.models import load_vlm

    if num_examples < 1:
        raise ValueError(f"--profile needs at least 1 example, got {num_examples}")
    if (out / CHECKPOINT_FILE).exists():
        raise ValueError(f"{out} holds a gate-training run; write the profiling pattern to another --out folder")
    _, _, adapter = load_vlm(settings.model, dtype=settings.dtype, device=settings.device,
                             max_pixels=settings.max_pixels, min_pixels=settings.min_pixels)
    scores = profile_heads(adapter, make_data(settings, adapter), num_examples, settings.sink, settings.recent,
                           progress=settings.progress)
    save_pattern(out / "pattern", scores, settings.sink, settings.recent, method=METHOD_LABEL,
                 model_name=settings.model, num_examples=num_examples, seed=settings.seed,
                 frames=list(settings.frames), dataset_name=settings.text_file or "duokit-synth-training")
    plot_gates_heatmap(scores, out / "plots" / "profile_heatmap.png", title="far-attention mass (NOT DuoAttention)")
    print(f"{METHOD_LABEL}: scores in {out / 'pattern'} (mean {scores.mean():.3f}, max {scores.max():.3f})")
    return 0
