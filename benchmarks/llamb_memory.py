"""`llamb` memory vs context length: peak KV bytes and peak RSS growth, against the baseline.

The model is the CPU benchmark LM of `_duo_bench.py` (random-init Qwen2), by default at a smaller size
(hidden 256, 4 layers, 4 query / 2 KV heads) so the baseline's quadratic prefill fits a shared 2-core
machine at 32k tokens; KV per token is 2·layers·KV heads·head_dim·4 B = 4 KiB. The prefix is the
video-shaped layout of `llavolta_cost.py`: 32 text tokens, temporal groups of 256 video tokens, text.
`llamb` runs uniform segments of at most `--groups-per-segment` g temporal groups (k = ⌈T/g⌉ − 1
boundaries for T groups, so a segment stays the same size at any length) and a memory of `--memory` tokens per layer: its cache
peaks at system + M + one segment + the text after the video, whatever the length; the baseline's
grows linearly. Each (variant, length) prefills through the engine (`Method.prefill`, `LM.forward`,
chunks of `--chunk`) and decodes 4 tokens in a fresh subprocess with glibc's mmap threshold at 64 KiB
(as `duo_memory.py`), so RSS follows the live tensors; peak RSS growth is over the loaded model.

    nice -n 10 python benchmarks/llamb_memory.py --lengths 8192 16384 32768 --json docs/methods/llamb_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench
from llavolta_cost import GROUP_TOKENS, video_prefix

DECODE_TOKENS = 4


def llamb_settings(args: argparse.Namespace, length: int) -> dict:
    groups = (length - 64) // GROUP_TOKENS
    return {"segmentation": "uniform", "segments": -(-groups // args.groups_per_segment) - 1,
            "memory_tokens": args.memory}


def measure(args: argparse.Namespace) -> dict:
    """One run in this process: the worker side."""
    import torch

    from duokit.engine import LM, SampleInput
    from duokit.methods import get_method
    from duokit.metrics import PeakMemory, kv_cache_bytes
    from duokit.models.base import TokenCounts
    from duokit.models.text import TextAdapter

    model = bench.build_model(args)
    adapter = TextAdapter(model, None)
    lm = LM(model, adapter)
    length = args.worker_length
    method = get_method("baseline") if args.variant == "baseline" else get_method("llamb", **llamb_settings(args, length))
    prefix = video_prefix(model, adapter, length)
    memory = PeakMemory(args.device)
    with method.apply(model, adapter), memory.measure():
        prepared = method.prepare_prefix(prefix, SampleInput(None, None), lm)
        cache = method.prefill(lm, prepared, method.new_cache(lm, prepared), args.chunk)
        token = torch.tensor([[1]], device=args.device)
        for step in range(DECODE_TOKENS):
            hidden = lm.forward(cache, adapter.positions(prepared.next_position + step, 1), input_ids=token)
            token = lm.next_token_logits(hidden).argmax().view(1, 1)
    at_peak = TokenCounts(prefix.num_tokens - prefix.num_video_tokens + DECODE_TOKENS, prefix.num_video_tokens,
                          prefix.video_grids)
    return {"variant": args.variant, "tokens": length, "settings": method.settings(),
            "kv_bytes_peak": lm.kv_bytes_peak, "kv_bytes_final": kv_cache_bytes(cache),
            "kv_bytes_planned": method.estimate_sample_kv_bytes(lm.geometry, at_peak, prepared),
            "peak_growth_bytes": memory.growth_bytes, "peak_exact": memory.exact,
            "weights_bytes": sum(p.nbytes for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.set_defaults(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--baseline-max", type=int, default=32768, help="skip the baseline above this length")
    parser.add_argument("--memory", type=int, default=256, help="llamb memory_tokens M (one temporal group)")
    parser.add_argument("--groups-per-segment", type=int, default=8, help="the original's 8 frames per segment")
    parser.add_argument("--json", help="also write the rows to this JSON file (after every row)")
    parser.add_argument("--variant", choices=["baseline", "llamb"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker_length:
        print(json.dumps(measure(args)))
        return 0
    from duokit.io import atomic_write_json

    passthrough = _without_option(argv, "--lengths", "--json", "--baseline-max")
    command = " ".join(["python", "benchmarks/llamb_memory.py", *map(shlex.quote, argv)])
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    mib = 2**20
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, {args.dtype}; "
          f"llamb uniform, {args.groups_per_segment} groups of {GROUP_TOKENS} per segment, M {args.memory}; "
          f"chunk {args.chunk}")
    print(f"{'tokens':>7} {'variant':>8} {'KV peak MiB':>11} {'planned':>8} {'KV final MiB':>12} {'RSS growth MiB':>14}")
    rows = []
    for length in args.lengths:
        for variant in ("llamb", "baseline"):
            if variant == "baseline" and length > args.baseline_max:
                continue
            row = bench.run_memory_worker(__file__, passthrough, variant, length)
            rows.append(row)
            exact = row["kv_bytes_peak"] == row["kv_bytes_planned"]
            print(f"{length:>7} {variant:>8} {row['kv_bytes_peak'] / mib:>11.1f} {'exact' if exact else 'MISMATCH':>8} "
                  f"{row['kv_bytes_final'] / mib:>12.1f} {row['peak_growth_bytes'] / mib:>14.1f}", flush=True)
            if args.json:
                atomic_write_json(args.json, {"command": command, "date": date, "args": vars(args), "rows": rows})
    return 0 if all(row["kv_bytes_peak"] == row["kv_bytes_planned"] for row in rows) else 1


def _without_option(argv: list[str], *options: str) -> list[str]:
    """`argv` minus the given options and their values (the workers get one length each)."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] in options
        if not skipping:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
