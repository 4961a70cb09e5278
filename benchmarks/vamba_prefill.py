"""Vamba proxy prefill time vs context length: `vamba` at c temporal groups against `vamba` at c = all.

The model is the CPU benchmark LM of `_duo_bench.py` (random-init Qwen2, hidden 1024, 8 layers, 16 query /
4 KV heads by default) and the prefix the video-shaped layout of `llavolta_cost.py`: 32 text tokens,
temporal groups of 256 video tokens (one Qwen-VL group of 2 frames at 448x448 px) up to the context length,
32 text tokens. Variants, interleaved `--repeats` times (min and median reported):

- `vamba` at c = all (`chunk_frames=None`): the like-for-like baseline — the same method, prefill and
  kernels, every call global;
- `vamba` at each c of `--chunk-frames`: video chunks read the system prefix + sinks + their own chunk;
- stock `baseline` (the model's own sdpa attention) beside them.

`--chunk 0` (default) prefills each run of tokens with the same visible keys in one call, so c = all is
one causal flash call over the whole prefix (exactly the stock baseline's call) and every chunk of c is one
call of the same CPU flash kernel over sink_end + chunk keys: the kernels match. Analytic FLOP ratio: the
method's own `estimate_prefill_flops` (projections, MLP and attention pairs; embeddings and lm_head not
counted) for c over c = all, also given for attention alone.

    python benchmarks/vamba_prefill.py                                   # 8k and 16k, c = 8 and 2
    python benchmarks/vamba_prefill.py --lengths 8192 16384 32768 --json runs/vamba_prefill.json
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench
from llavolta_cost import video_prefix


def main(argv: list[str] | None = None) -> int:
    from duokit.engine import LM, SampleInput
    from duokit.io import atomic_write_json
    from duokit.methods import get_method
    from duokit.metrics import Stopwatch
    from duokit.models.text import TextAdapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.set_defaults(chunk=0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[8, 2], help="c values (temporal groups)")
    parser.add_argument("--sinks", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per variant")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock sdpa baseline")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    model = bench.build_model(args)
    adapter = TextAdapter(model, None)
    lm, sample = LM(model, adapter), SampleInput(None, None)
    methods = {"vamba_all": get_method("vamba", chunk_frames=None, sinks=args.sinks)}
    methods.update({f"vamba_c{c}": get_method("vamba", chunk_frames=c, sinks=args.sinks) for c in args.chunk_frames})
    if not args.no_stock:
        methods["stock_sdpa"] = get_method("baseline")
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, {args.dtype}, "
          f"threads {torch.get_num_threads()}; sinks {args.sinks}; chunk {args.chunk or 'one call per run'}")
    command = " ".join(["python", "benchmarks/vamba_prefill.py", *map(shlex.quote, sys.argv[1:])])
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows = []
    for length in args.lengths:
        prefix = video_prefix(model, adapter, length)
        chunk = args.chunk or length
        seconds = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                with method.apply(model, adapter):
                    cache = method.new_cache(lm, method.prepare_prefix(prefix, sample, lm))
                    with Stopwatch(args.device) as watch:
                        method.prefill(lm, prefix, cache, chunk)
                seconds[name].append(watch.seconds)
                del cache
        flops = {name: method.estimate_prefill_flops(lm.geometry, [length] * args.layers, prefix.token_counts)
                 for name, method in methods.items()}
        reference = seconds["vamba_all"]
        row = {"tokens": length, "video_tokens": prefix.num_video_tokens,
               "groups": prefix.video_grids[0][0], "prefill_s": {}, "variants": {}}
        for name in methods:
            runs = seconds[name]
            row["prefill_s"][name] = {"min": min(runs), "median": statistics.median(runs), "runs": runs}
            row["variants"][name] = {
                "time_ratio_min": min(runs) / min(reference),
                "time_ratio_median": statistics.median(runs) / statistics.median(reference),
                "flop_ratio": sum(flops[name].values()) / sum(flops["vamba_all"].values()),
                "attention_flop_ratio": flops[name]["attention_flops"] / flops["vamba_all"]["attention_flops"]}
        rows.append(row)
        for name, ratios in row["variants"].items():
            timing = row["prefill_s"][name]
            print(f"{length:>6} {name:>11}: {timing['min']:8.2f} / {timing['median']:8.2f} s (min/median)  "
                  f"time ratio {ratios['time_ratio_min']:.3f} / {ratios['time_ratio_median']:.3f}  "
                  f"FLOP ratio {ratios['flop_ratio']:.3f} (attention {ratios['attention_flop_ratio']:.3f})",
                  flush=True)
        if args.json:  # after every length, so a long run that is stopped keeps what it measured
            atomic_write_json(args.json, {"command": command, "date": date, "args": vars(args),
                                          "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
