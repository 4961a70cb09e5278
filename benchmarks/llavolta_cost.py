"""LLaVolta cost: prefill time and KV bytes vs the baseline, against the analytic ratios.

The model is the CPU benchmark LM of `_duo_bench.py` (random-init Qwen2, hidden 1024, 8 layers, 16 query /
4 KV heads). Its prefix is a video-shaped layout: 32 text tokens, temporal groups of 256 video tokens
(one Qwen-VL group of 2 frames at 448x448 px, 16x16 merged tokens) up to the context length, 32 text
tokens; 1-D positions. Both variants run the same chunked prefill (`Method.prefill`, chunks of `--chunk`
tokens) through the model's own sdpa attention, interleaved `--repeats` times; the min and median are
reported. Analytic ratios: KV = (K·T + (L−K)·T') / (L·T) for T tokens, T' after pooling, L layers;
prefill FLOPs = projections and MLP (2·params per token per layer) plus causal attention
(4·head_dim·heads per (query, key) pair, T(T+1)/2 pairs per layer), each layer on T or T' tokens.

    python benchmarks/llavolta_cost.py                                  # 8k and 16k, heavy (K=2, s=8)
    python benchmarks/llavolta_cost.py --lengths 8192 16384 32768 --json runs/llavolta_cost.json
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

TEXT_TOKENS = 32  # before and after the video
GROUP_TOKENS = 256  # one Qwen-VL temporal group at 448x448 px


def video_prefix(model, adapter, length: int):
    """A `Prefix` of `length` tokens: text, whole temporal groups of video tokens, text."""
    from duokit.models.base import Prefix

    groups = (length - 2 * TEXT_TOKENS) // GROUP_TOKENS
    tail = length - TEXT_TOKENS - groups * GROUP_TOKENS
    frame_of = torch.cat([torch.full((TEXT_TOKENS,), -1), torch.arange(groups).repeat_interleave(GROUP_TOKENS),
                          torch.full((tail,), -1)])
    ids = bench.token_ids(length, model.config.vocab_size, str(model.device))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    side = int(GROUP_TOKENS ** 0.5)  # a group is a 16x16 merged grid, raster order
    return Prefix(input_ids=ids, inputs_embeds=embeds, position_ids=adapter.positions(0, length),
                  video_mask=frame_of >= 0, next_position=length, frame_of=frame_of,
                  video_grids=((groups, side, side),))


def prefill_flops(config, token_counts: list[int]) -> float:
    """Analytic prefill FLOPs of a language model whose layer l runs on token_counts[l] tokens."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    params = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * config.intermediate_size
    return sum(2 * params * t + 4 * head_dim * heads * t * (t + 1) / 2 for t in token_counts)


def main(argv: list[str] | None = None) -> int:
    from duokit.engine import LM, SampleInput
    from duokit.io import atomic_write_json
    from duokit.methods import get_method
    from duokit.methods.llavolta.pooling import pooled_length
    from duokit.metrics import Stopwatch, kv_cache_bytes
    from duokit.models.text import TextAdapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--layer", type=int, default=2, help="K (default: the heavy preset's 2)")
    parser.add_argument("--stride", type=int, default=8, help="s (default: the presets' 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per variant")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    model = bench.build_model(args)
    adapter = TextAdapter(model, None)
    lm, sample = LM(model, adapter), SampleInput(None, None)  # the prefix is built here, not from a sample
    config = adapter.text_config
    methods = {"baseline": get_method("baseline"), "llavolta": get_method("llavolta", layer=args.layer,
                                                                          stride=args.stride)}
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, {args.dtype}, "
          f"threads {torch.get_num_threads()}; llavolta K={args.layer} s={args.stride}; chunk {args.chunk}")
    print(f"{'tokens':>7} {'base s (min/med)':>17} {'llavolta s':>14} {'time ratio':>10} {'FLOP ratio':>10} "
          f"{'base KV MiB':>11} {'llavolta KV':>11} {'KV ratio':>8} {'formula':>7}")
    command = " ".join(["python", "benchmarks/llavolta_cost.py", *map(shlex.quote, sys.argv[1:])])
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows = []
    for length in args.lengths:
        prefix = video_prefix(model, adapter, length)
        seconds = {name: [] for name in methods}
        kv = {}
        for _ in range(args.repeats):
            for name, method in methods.items():
                with method.apply(model, adapter):
                    prepared = method.prepare_prefix(prefix, sample, lm)
                    cache = method.new_cache(lm, prepared)
                    with Stopwatch(args.device) as watch:
                        method.prefill(lm, prepared, cache, args.chunk)
                seconds[name].append(watch.seconds)
                kv[name] = kv_cache_bytes(cache)
                del cache
        groups = [h * w for t, h, w in prefix.video_grids for _ in range(t)]
        pooled = pooled_length(length, groups, args.stride)
        counts = [length] * args.layer + [pooled] * (args.layers - args.layer)
        flop_ratio = prefill_flops(config, counts) / prefill_flops(config, [length] * args.layers)
        planned = methods["llavolta"].estimate_kv_bytes(lm.geometry, prefix.token_counts)
        base, ours = seconds["baseline"], seconds["llavolta"]
        row = {"tokens": length, "video_tokens": sum(groups), "pooled_tokens": pooled,
               "baseline_prefill_s": {"min": min(base), "median": statistics.median(base), "runs": base},
               "llavolta_prefill_s": {"min": min(ours), "median": statistics.median(ours), "runs": ours},
               "time_ratio_min": min(ours) / min(base),
               "time_ratio_median": statistics.median(ours) / statistics.median(base),
               "analytic_flop_ratio": flop_ratio,
               "baseline_kv_bytes": kv["baseline"], "llavolta_kv_bytes": kv["llavolta"],
               "kv_ratio": kv["llavolta"] / kv["baseline"], "planned_kv_bytes": planned,
               "kv_equals_formula": planned == kv["llavolta"]}
        rows.append(row)
        print(f"{length:>7} {min(base):>8.2f}/{statistics.median(base):<8.2f} {min(ours):>6.2f}/{statistics.median(ours):<7.2f}"
              f" {row['time_ratio_min']:>10.3f} {flop_ratio:>10.3f} {kv['baseline'] / 2**20:>11.1f} "
              f"{kv['llavolta'] / 2**20:>11.1f} {row['kv_ratio']:>8.3f} {row['kv_equals_formula']!s:>7}",
              flush=True)
        if args.json:  # after every row, so a long run that is stopped keeps what it measured
            atomic_write_json(args.json, {"command": command, "date": date, "args": vars(args),
                                          "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
