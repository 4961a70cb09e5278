"""DuoAttention speed: chunked prefill time and decode-step time vs the sdpa baseline.

Decoding is bound by the bytes read per step (weights + KV cache), so the ideal decode speedup is
(weights + baseline KV) / (weights + duo KV); the script prints the measured speedup as a fraction
of it (times are minima over interleaved repeats): `ratio` = measured / ideal speedup, `gain` = (measured − 1) / (ideal − 1). Prefill runs in chunks of `--chunk` tokens for both variants.

    python benchmarks/duo_speed.py                       # default: 2k and 4k tokens (a few minutes on 2 cores)
    python benchmarks/duo_speed.py --lengths 8192 16384 32768
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench


def time_variants(model, methods: dict, ids, args) -> dict:
    """Prefill and decode timings of every variant, interleaved so that load on a shared machine hits
    all of them alike; the minimum over repeats estimates the uncontended time, the median is shown too."""
    from duokit.metrics import Stopwatch, kv_cache_bytes

    prefill_s = {name: [] for name in methods}
    caches, tokens = {}, {}
    for _ in range(args.repeats):
        for name, method in methods.items():
            with bench.applied(model, method):
                cache = bench.new_cache(model, method)
                with Stopwatch(args.device) as watch:
                    tokens[name] = bench.prefill(model, cache, ids, args.chunk, label=f"prefill {name}").argmax(-1)
            prefill_s[name].append(watch.seconds)
            caches[name] = cache
    kv_bytes = {name: kv_cache_bytes(cache) for name, cache in caches.items()}
    decode_s = {name: [] for name in methods}
    for step in range(args.warmup + args.steps):
        for name, method in methods.items():
            with bench.applied(model, method), Stopwatch(args.device) as watch:
                tokens[name] = bench.decode_step(model, caches[name], tokens[name])
            if step >= args.warmup:
                decode_s[name].append(watch.seconds)
    return {name: {"prefill_s": min(prefill_s[name]), "prefill_s_median": statistics.median(prefill_s[name]),
                   "decode_s": min(decode_s[name]), "decode_s_median": statistics.median(decode_s[name]),
                   "kv_bytes": kv_bytes[name]} for name in methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per variant")
    parser.add_argument("--repeats", type=int, default=2, help="timed prefills per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    model = bench.build_model(args)
    method = bench.make_duo(args)
    weights = sum(p.nbytes for p in model.parameters())
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, "
          f"{args.dtype}, weights {weights / 2**20:.0f} MiB; duo: sparsity {args.sparsity}, sink {args.sink}, "
          f"recent {args.recent}; chunk {args.chunk}")
    print(f"{'tokens':>7} {'prefill base s':>14} {'prefill duo s':>13} {'speedup':>7} "
          f"{'decode base ms':>14} {'decode duo ms':>13} {'speedup':>7} {'ideal':>6} {'ratio':>6} {'gain':>5}")
    rows = []
    for length in args.lengths:
        ids = bench.token_ids(length, args.vocab, args.device)
        timings = time_variants(model, {"baseline": None, "duo": method}, ids, args)
        base, duo = timings["baseline"], timings["duo"]
        ideal = (weights + base["kv_bytes"]) / (weights + duo["kv_bytes"])
        decode_speedup = base["decode_s"] / duo["decode_s"]
        prefill_speedup = base["prefill_s"] / duo["prefill_s"]
        rows.append({"tokens": length, "baseline": base, "duo": duo, "weights_bytes": weights,
                     "prefill_speedup": prefill_speedup, "decode_speedup": decode_speedup,
                     "ideal_decode_speedup": ideal})
        print(f"{length:>7} {base['prefill_s']:>14.2f} {duo['prefill_s']:>13.2f} {prefill_speedup:>6.2f}x "
              f"{base['decode_s'] * 1e3:>14.1f} {duo['decode_s'] * 1e3:>13.1f} {decode_speedup:>6.2f}x "
              f"{ideal:>5.2f}x {decode_speedup / ideal:>6.0%} {(decode_speedup - 1) / max(ideal - 1, 1e-9):>5.0%}")
    if args.json:
        from duokit.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
