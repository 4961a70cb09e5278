"""`duokit eval` (and `run_eval`, its Python form for notebooks): evaluate a model with a method on
VNBench into a resumable run directory.

RUN/config.json       the full configuration, versions included; a re-run must match it
RUN/predictions.jsonl one duokit prediction record per try, appended as produced (resumable)
RUN/summary.json      {"scores": <scorer JSON>, "cost": {...}, "config": {...}}

Under `accelerate launch` with N > 1 processes, each process appends its share of the samples to
RUN/predictions.rank{R}-of-{N}.jsonl, and the main process merges them into predictions.jsonl
(duokit.distributed, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

# Config keys that decide what the predictions are; a resumed run must agree on all of them. The chunk
# size is one: a method may attend differently per chunk (duo's full_first_chunk).
RUN_IDENTITY = ("model", "method", "frames", "per_task", "seed", "parser", "max_new_tokens",
                "dtype", "max_pixels", "min_pixels", "samples", "chunk_size", "annotations_sha256")

# Short flags kept from before `--set` existed (`--pattern DIR --sparsity 0.5 --sink 64 --recent 256`):
# each is `--set NAME=VALUE`, typed and checked by whichever method is chosen. Method classes are not
# read here, so `--help` stays free of torch.
SETTING_SHORTCUTS = ("pattern", "sparsity", "sink", "recent")

# How a question's tries (option orders) are decoded; not part of RUN_IDENTITY: the tokens are equal either
# way, only the memory held and the decode time differ (docs/decoding.md).
DECODE_TRIES = ("together", "one_by_one")


def register(subparsers) -> None:
    from duokit.data.scoring import PARSERS

    parser = subparsers.add_parser(
        "eval", help="evaluate a model + method on VNBench (resumable run directory)",
        description="Evaluate a VNBench annotation file: per sample the video prefix is prefilled once and "
                    "the 4 tries reuse it. Re-running with the same --out resumes.")
    # Defaults that live in torch-importing modules are filled in by `evaluate`, keeping --help fast.
    parser.add_argument("--model", default=None,
                        help="hub id, local directory, or tiny:<family> "
                             "(default: duokit.models.DEFAULT_MODEL, Qwen/Qwen2.5-VL-3B-Instruct)")
    parser.add_argument("--method", default="baseline", help="method name (default: baseline)")
    parser.add_argument("--set", "--setting", dest="setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a method setting (repeatable), typed from the method's settings; an unknown "
                             "KEY lists the valid ones")
    for name in SETTING_SHORTCUTS:
        parser.add_argument(f"--{name}", default=None, metavar="VALUE", help=f"same as --set {name}=VALUE")
    parser.add_argument("--annotations", required=True, help="VNBench annotation JSON")
    parser.add_argument("--videos", required=True, help="folder holding the videos")
    parser.add_argument("--frames", type=int, required=True, help="frames sampled uniformly per video")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--per-task", type=int, default=None, help="evaluate N samples per sub-task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --per-task subset")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="prefill chunk in tokens (default: 2048)")
    parser.add_argument("--parser", choices=PARSERS, default=None,
                        help="answer parser (docs/scoring.md; default: the model's own, e.g. text for needlenet, "
                             "else official)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decode-tries", choices=DECODE_TRIES, default="together",
                        help="together: a question's option orders decode as one batch where the method supports "
                             "it (faster; holds one suffix per try); one_by_one: one at a time (default: together)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="on resume, evaluate again the tries logged with an error (a video that could not "
                             "be read, out of GPU memory, non-finite logits); without it they stay scored wrong")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on sm80+; fp32 on CPU; on T4 fp16, fp32 for Qwen-VL) | float32 | float16 "
                             "| bfloat16; the run records the resolved dtype")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_video_options(parser)
    parser.set_defaults(func=run)


def add_video_options(parser: argparse.ArgumentParser) -> None:
    """--max-pixels/--min-pixels (pixels per frame, docs/video.md) and --attn-implementation."""
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="pixels per frame the processor resizes frames down to (Qwen-VL; default 200704 = "
                             "448x448, 128 tokens/frame on Qwen2.5-VL, or the model's own cap if lower; "
                             "docs/video.md)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="pixels per frame small frames are resized up to (Qwen-VL; default: the model's own)")
    parser.add_argument("--attn-implementation", default="auto",
                        choices=("auto", "sdpa", "flash_attention_2", "eager"),
                        help="attention kernel of the vision tower and of methods that keep the model's own "
                             "attention (default auto: flash_attention_2 when flash_attn is installed on an "
                             "sm80+ GPU in fp16/bf16, else sdpa)")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as text; the method types them from its dataclass fields (`get_method`)."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        settings[key] = value
    return settings


def versions() -> dict[str, str]:
    import torch
    import transformers

    from duokit import __version__

    return {"duokit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def select_samples(annotations: str | Path, per_task: int | None, seed: int) -> list:
    from duokit.data.vnbench import group_samples, load_annotations, stratified_subset

    samples = group_samples(load_annotations(annotations))
    return samples if per_task is None else stratified_subset(samples, per_task, seed)


def video_bytes(video_name: str, videos: str | Path) -> int | None:
    """The size of a sample's video file (None when missing). Each record keeps it: sample ids say nothing
    of the videos (a synthetic set re-made at another size keeps its ids), so a resume evaluates again
    the tries made on a video that has changed since; sizes, not contents, keep that check a moment's work
    on VNBench's gigabytes."""
    from duokit.data.vnbench import resolve_video

    try:
        return resolve_video(video_name, videos).stat().st_size
    except OSError:
        return None


def video_file_sizes(samples: list, videos: str | Path) -> dict[str, int | None]:
    """{sample id: its video's size in bytes, None when missing}. Refuses a `videos` folder that holds none
    of them (a wrong folder would otherwise be a run of failed samples scored 0%); a few missing ones are
    recorded as errors when evaluated."""
    from duokit.data.vnbench import VIDEO_FOLDERS

    if not Path(videos).is_dir():
        raise FileNotFoundError(f"--videos {videos}: not a folder; give {VIDEO_FOLDERS}")
    sizes = {sample.sample_id: video_bytes(sample.video_name, videos) for sample in samples}
    if samples and all(size is None for size in sizes.values()):
        raise FileNotFoundError(f"--videos {videos}: none of the {len({s.video_name for s in samples})} videos the "
                                f"annotations name is there (e.g. {samples[0].video_name}); give {VIDEO_FOLDERS}")
    return sizes


def redo_logged(out: Path, sizes: dict[str, int | None], retry_errors: bool) -> None:
    """Remove from RUN/predictions.jsonl, to be evaluated again, the tries made on a video whose size has
    changed since (`sizes`: `video_file_sizes` now; records without `video_bytes`, from before it was kept, are
    trusted) and, with `retry_errors`, the tries logged with an error."""
    from duokit.io import JsonlLog

    def changed(record: dict) -> bool:
        return "video_bytes" in record and record["video_bytes"] != sizes[record["sample_id"]]

    def failed(record: dict) -> bool:
        return retry_errors and record["error"] is not None

    log = JsonlLog(out / "predictions.jsonl", key="record_id")
    for unwanted, why in ((changed, "made on a video that has changed since"), (failed, "logged with an error")):
        dropped = log.drop(unwanted)
        if dropped:
            print(f"{out}: evaluating again {len(dropped)} tries {why} "
                  f"({len({r['sample_id'] for r in dropped})} samples)", file=sys.stderr)


def check_config(out: Path, config: dict) -> dict:
    """`config` as RUN/config.json stores it, after checking that an existing one describes the same run."""
    from duokit.io import read_json

    path = out / "config.json"
    config = json.loads(json.dumps(config, default=str))  # compare as stored: tuples as lists, paths as str
    if path.exists():
        previous = read_json(path)
        changed = [key for key in RUN_IDENTITY if previous.get(key) != config.get(key)]
        if changed:
            values = "; ".join(f"{key}: {previous.get(key)!r} -> {config.get(key)!r}" for key in changed
                               if key not in ("samples", "annotations_sha256"))
            if "annotations_sha256" in changed:
                values += f"{'; ' if values else ''}the annotation file changed since the run began"
            raise ValueError(f"{path}: this run directory holds a different run (differs in: "
                             f"{', '.join(changed)}{'; ' + values if values else ''}); use a new --out, "
                             "or delete the directory to start over")
    return config


def frame_sizes(samples: list, videos: str | Path) -> dict[str, tuple[int, int]]:
    """{video name: (height, width)} of the samples' readable videos, from their headers."""
    from duokit.data.video import VideoError, frame_size
    from duokit.data.vnbench import resolve_video

    sizes = {}
    for name in sorted({sample.video_name for sample in samples}):
        try:
            sizes[name] = frame_size(resolve_video(name, videos))
        except (VideoError, OSError):
            continue  # the sample is recorded as an error when it is evaluated
    return sizes


def largest_frame_size(samples: list, videos: str | Path,
                       sizes: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """(height, width) of the largest frames (by pixel count) among the samples' readable videos, from
    their headers (or `sizes`, from `frame_sizes`), for the memory planner (its default if none is readable)."""
    from duokit.metrics import DEFAULT_FRAME_SIZE

    sizes = frame_sizes(samples, videos) if sizes is None else sizes
    return max(sizes.values(), key=lambda size: size[0] * size[1], default=DEFAULT_FRAME_SIZE)


def predicted_costs(samples: list, sizes: dict[str, tuple[int, int]], plan_tokens: Any) -> list[float]:
    """Each sample's predicted cost for sharding (docs/scaling.md): the planner's prefix token count at
    its video's frame size (`plan_tokens(height, width)`, asked once per size), which drives the vision
    tower, the prefill and every try's attention, plus the video's duration as a fraction of the
    longest (at most 1 token): among equal token counts (most of VNBench, whose frames are capped at the
    same pixels) the longer videos, slower to decode when the decoder reads up to the last sampled frame
    (PyAV), are spread first. 0 for an unreadable video (it is an error at once)."""
    tokens = {size: plan_tokens(*size) for size in sorted(set(sizes.values()))}
    longest = max((s.tries[0].length for s in samples), default=0.0)
    return [tokens[sizes[s.video_name]] + (s.tries[0].length / longest if longest > 0 else 0.0)
            if s.video_name in sizes else 0.0 for s in samples]


def summarize_cost(records: list[dict]) -> dict:
    """Run-level costs from the per-sample costs in the prediction records (docs/metrics.md): for every
    numeric key any sample has, its mean over the samples that have it and `<key>_max`; for every
    boolean key, whether it holds for all; `needle_coverage` from `needles_missed`. A method's own cost
    keys are aggregated like the rest."""
    per_sample = {r["sample_id"]: r["cost"] for r in records if r.get("cost")}
    n_errors = len({r["sample_id"] for r in records if r.get("error")})
    summary: dict[str, Any] = {"n_samples": len(per_sample), "n_errors": n_errors}
    costs = list(per_sample.values())
    keys = sorted({key for cost in costs for key in cost})
    for key in keys:
        values = [cost[key] for cost in costs if key in cost]
        if all(isinstance(v, bool) for v in values):
            summary[key] = all(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            summary[key] = sum(values) / len(values)
            summary[f"{key}_max"] = max(values)
    if any("needles_missed" in cost for cost in costs):
        covered = [cost["needles_missed"] == 0 for cost in costs if "needles_missed" in cost]
        summary["needle_coverage"] = sum(covered) / len(covered)
    return summary


def evaluate_sample(lm: Any, method: Any, sample: Any, video_dir: str | Path, num_frames: int,
                    parser: str = "official", chunk_size: int | None = None, max_new_tokens: int | None = None,
                    skip: set[str] | frozenset = frozenset(), tries_together: bool = True) -> list[dict]:
    """Prediction records (duokit.data.scoring) for the tries of VNBench `sample` not in `skip` (record ids).

    A video that cannot be found or decoded, a sample that runs out of GPU memory, or NaN/inf logits give
    records with `error` set (scored as wrong, counted in n_errors) instead of stopping the run.
    """
    import torch

    from duokit.data.scoring import prediction_record
    from duokit.data.video import VideoError, load_frames, needle_coverage, sampled_fps
    from duokit.data.vnbench import question_part, resolve_video
    from duokit.engine import (
        DEFAULT_CHUNK_SIZE,
        MAX_NEW_TOKENS,
        NonFiniteLogits,
        SampleInput,
        Try,
        answer_tries,
    )

    tries = [record for record in sample.tries if record.record_id not in skip]
    if not tries:
        return []
    size = video_bytes(sample.video_name, video_dir)
    try:
        video = load_frames(resolve_video(sample.video_name, video_dir), num_frames=num_frames)
        result = answer_tries(lm, method, SampleInput(video.frames, sampled_fps(video.timestamps, video.fps)),
                              [Try(record.prompt, question_part(record.question)) for record in tries],
                              chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                              max_new_tokens=max_new_tokens or MAX_NEW_TOKENS, tries_together=tries_together)
    except (VideoError, OSError, torch.OutOfMemoryError, NonFiniteLogits) as err:
        if isinstance(err, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        error = f"{type(err).__name__}: {err}"
        return [prediction_record(record, None, parser, error=error, video_bytes=size) for record in tries]
    coverage = needle_coverage(sample.needle_time, video.timestamps)
    cost = {**result.cost, "needle_frames": list(coverage.frames_per_needle),
            "needles_missed": len(coverage.missed)}
    return [prediction_record(record, answer.text, parser, output_tokens=answer.tokens,
                              cost={**cost, "decode_s": answer.decode_s}, video_bytes=size)
            for record, answer in zip(tries, result.answers)]


def run_eval(annotations: str | Path, videos: str | Path, frames: int, out: str | Path, model: str | None = None,
             method: str = "baseline", settings: dict[str, Any] | None = None, per_task: int | None = None,
             seed: int = 0, chunk_size: int | None = None, parser: str | None = None, dtype: str = "auto",
             device: str = "auto", max_new_tokens: int | None = None, max_pixels: int | None = None,
             min_pixels: int | None = None, attn_implementation: str = "auto", world: Any = None,
             decode_tries: str = "together", retry_errors: bool = False) -> dict:
    """Run (or resume) an evaluation into the run directory `out`; returns the summary it writes to
    `out/summary.json`. The Python form of `duokit eval` (same defaults; `settings` = the method's
    settings, e.g. `{"pattern": DIR, "sparsity": 0.5}`; `max_pixels`/`min_pixels`: pixels per frame, see
    `duokit.models.load_vlm`). `decode_tries`: `together` (the 4 option orders as one batch where the
    method supports it, docs/decoding.md) or `one_by_one` (one suffix held at a time: the memory and
    decode time every method pays alike; `duokit ablate` uses it). `world` (a `duokit.distributed.World`; default: this process's, from
    `accelerate launch`) decides who does which samples: `current_world().alone()` runs the whole run in
    this process of a launched job (`duokit ablate` spreading whole cells over the processes).
    `retry_errors`: tries logged with an error (unreadable video, out of memory, non-finite logits) are
    removed from the log and evaluated again; by default a resume keeps them, scored wrong.

    Everything that can be checked is checked before RUN/config.json is written: the arguments, an
    existing run's config, and the method against the loaded model (e.g. a DuoAttention pattern's shape).
    """
    from tqdm.auto import tqdm

    from duokit.data.scoring import PARSERS, score_predictions
    from duokit.distributed import current_world, log_line, merge_shards, shard_path
    from duokit.engine import DEFAULT_CHUNK_SIZE, LM, MAX_NEW_TOKENS
    from duokit.io import JsonlLog, atomic_write_json
    from duokit.methods import get_method
    from duokit.metrics import plan_memory, warn_if_too_big
    from duokit.models import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, answer_parser, load_vlm, resolve_precision
    from duokit.models.loading import device_kind, pick_attn_implementation

    model_name = model or DEFAULT_MODEL
    parser = parser or answer_parser(model_name)  # the answer mode recorded with the model (duokit.json)
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    for name, value in (("frames", frames), ("chunk_size", chunk_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; known: {', '.join(PARSERS)}")
    if decode_tries not in DECODE_TRIES:
        raise ValueError(f"decode_tries must be one of {', '.join(DECODE_TRIES)}, got {decode_tries!r}")
    tries_together = decode_tries == "together"
    method_instance = get_method(method, **(settings or {}))
    samples = select_samples(annotations, per_task, seed)
    file_sizes = video_file_sizes(samples, videos)
    # Under `accelerate launch` with N > 1 processes each takes a share of the samples (docs/scaling.md).
    world = current_world(cpu=device == "cpu") if world is None else world
    if world.device is not None and device in ("auto", "cuda"):
        device = world.device  # one device per process
    # The run records what "auto" resolves to here, so a resume on a GPU of another precision is refused.
    device, dtype = resolve_precision(model_name, dtype, device)
    attn_implementation = pick_attn_implementation(device, dtype, attn_implementation)
    out = Path(out)
    config = check_config(out, {
        "model": model_name, "method": method_instance.settings(),
        "annotations": str(Path(annotations).resolve()),
        "videos": str(Path(videos).resolve()), "frames": frames, "per_task": per_task,
        "seed": seed, "parser": parser, "max_new_tokens": max_new_tokens,
        "chunk_size": chunk_size, "dtype": str(dtype).removeprefix("torch."), "device": device_kind(device),
        "max_pixels": DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, "min_pixels": min_pixels,
        "attn_implementation": attn_implementation, "decode_tries": decode_tries,
        "samples": [sample.sample_id for sample in samples],
        "annotations_sha256": hashlib.sha256(Path(annotations).read_bytes()).hexdigest(), "versions": versions(),
    })
    order = [record.record_id for sample in samples for record in sample.tries]
    # Shards left by a killed sharded run (any N) count as done: fold them in before anyone reads the log.
    if world.is_main and merge_shards(out, order):
        print(f"{out}: merged the prediction shards of an interrupted sharded run", file=sys.stderr)
    if world.is_main:
        redo_logged(out, file_sizes, retry_errors)
    world.barrier()
    log = JsonlLog(out / "predictions.jsonl", key="record_id")
    todo = [s for s in samples if any(record.record_id not in log for record in s.tries)]

    if not todo:
        if world.is_main:
            atomic_write_json(out / "config.json", config)
    else:
        vlm, _, adapter = load_vlm(model_name, dtype=dtype, device=device, max_pixels=max_pixels,
                                   min_pixels=min_pixels, attn_implementation=attn_implementation)
        # Entering `apply` checks the method against the model, so a bad method leaves no run directory.
        with method_instance.apply(vlm, adapter):
            if world.is_main:
                atomic_write_json(out / "config.json", config)
            sizes = frame_sizes(todo, videos)

            def plan(height, width):
                return plan_memory(vlm, adapter, method_instance, frames, height, width, chunk_size=chunk_size,
                                   max_new_tokens=max_new_tokens, tries=4 if tries_together else 1)

            largest = plan(*largest_frame_size(todo, videos, sizes))
            if world.is_main:
                print(largest.describe(), file=sys.stderr)
                warn_if_too_big(largest)
            mine, shard = todo, log
            if world.size > 1:
                mine = world.share(todo, predicted_costs(todo, sizes, lambda h, w: plan(h, w).prefix_tokens))
                shard = JsonlLog(shard_path(out, world.rank, world.size), key="record_id")
                log_line(f"rank {world.rank}/{world.size} on {device}: {len(mine)} of {len(todo)} samples")
            initial = len(samples) - len(todo) if world.size == 1 else 0
            bar = tqdm(mine, desc="eval", unit="sample", initial=initial, total=initial + len(mine),
                       disable=not world.is_main)
            lm = LM(vlm, adapter)
            for count, sample in enumerate(bar, start=1):
                records = evaluate_sample(lm, method_instance, sample, videos, frames, parser, chunk_size,
                                          max_new_tokens, skip=log.done, tries_together=tries_together)
                for record in records:
                    shard.append(record)
                correct = sum(r["correct"] for r in shard.records)
                bar.set_postfix(acc_1try=f"{correct / len(shard.records):.3f}")
                world.kill_point(count)
    if world.size > 1:
        world.barrier()  # every shard complete
        if world.is_main:
            merge_shards(out, order)
        world.barrier()
        log = JsonlLog(out / "predictions.jsonl", key="record_id")
    wanted = set(order)
    records = [r for r in log.records if r["record_id"] in wanted]
    summary = {"scores": score_predictions(records), "cost": summarize_cost(records), "config": config}
    if world.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        flags = {name: getattr(args, name) for name in SETTING_SHORTCUTS if getattr(args, name) is not None}
        summary = run_eval(args.annotations, args.videos, args.frames, args.out, model=args.model,
                           method=args.method, settings={**parse_settings(args.setting), **flags},
                           per_task=args.per_task, seed=args.seed, chunk_size=args.chunk_size,
                           parser=args.parser, dtype=args.dtype, device=args.device,
                           max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels,
                           min_pixels=args.min_pixels, attn_implementation=args.attn_implementation,
                           decode_tries=args.decode_tries, retry_errors=args.retry_errors)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"duokit eval: error: {err}", file=sys.stderr)
        return 1
    from duokit.distributed import is_main_process

    if not is_main_process():  # under `accelerate launch` the main process reports for all
        return 0
    scores = summary["scores"]
    failed = summary["cost"]["n_errors"]
    print(f"{args.out}: Overall {100 * scores['overall']:.1f}% (4-try), {100 * scores['overall_1try']:.1f}% "
          f"(1-try) on {scores['n_samples']} samples"
          + (f"; {failed} failed, counted wrong (errors in {Path(args.out) / 'predictions.jsonl'})" if failed else ""))
    return 0
