"""Decode speed of fair setups, and DuoAttention's speedup as a fraction of the ideal (docs/decoding.md).

Setups (benchmarks/_duo_bench.py): `stock` = transformers' sdpa + DynamicCache, what a user would run
otherwise; `stock-preallocated` = the same attention on duokit's preallocated cache; `dense` = duo's own
kernels and cache with every head a retrieval head (duo at sparsity 0), the baseline for what duo
saves; `duo-S` = duo at sparsity S. Decoding is bound by the bytes a step moves, so the ideal speedup of
duo-S over dense is bytes(dense) / bytes(duo-S), counting the weights, the KV attention reads and what
the cache writes to append (`bytes_moved_per_step`). Each cache holds `length` random tokens (a decode
step's time depends on the sizes only); the setups' steps are interleaved so machine load hits them
alike; min and median over the steps are reported. The script re-runs itself with MALLOC_MMAP_MAX_=0
(no mmapped allocations, so big `torch.cat` results reuse freed heap blocks instead of fresh pages)
unless given --default-allocator or MALLOC_* settings; the allocator is recorded.

    python benchmarks/duo_speed.py --lengths 4096 16384 32768 --threads 1 --json duo_speed.json
    python benchmarks/duo_speed.py --lengths 4096 --prefill     # also chunked prefill times (slow on CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench
import torch


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times)}


@torch.no_grad()
def time_decode(model, chosen: dict, length: int, args: argparse.Namespace, weights: int) -> dict:
    from duokit.metrics import Stopwatch, kv_cache_bytes

    reserve = args.warmup + args.steps + 1
    caches = {name: bench.filled_cache(model, method, kind, length, reserve) for name, (method, kind) in chosen.items()}
    moved = {name: bench.bytes_moved_per_step(caches[name], kind, weights) for name, (_, kind) in chosen.items()}
    held = {name: kv_cache_bytes(cache) for name, cache in caches.items()}
    token = torch.ones(1, 1, dtype=torch.long, device=args.device)
    times = {name: [] for name in chosen}
    for step in range(args.warmup + args.steps):
        position = torch.tensor([[length + step]], device=args.device)
        for name, (method, _) in chosen.items():
            with bench.applied(model, method), Stopwatch(args.device) as watch:
                model(input_ids=token, position_ids=position, past_key_values=caches[name], use_cache=True)
            if step >= args.warmup:
                times[name].append(watch.seconds)
    return {name: {"decode": summary(times[name]), "kv_bytes": held[name], "bytes_per_step": moved[name]}
            for name in chosen}


@torch.no_grad()
def time_prefill(model, chosen: dict, length: int, args: argparse.Namespace) -> dict:
    from transformers import DynamicCache

    from duokit.metrics import Stopwatch

    ids = bench.token_ids(length, args.vocab, args.device)
    times = {name: [] for name, (_, kind) in chosen.items() if kind != "preallocated"}
    for _ in range(args.repeats):
        for name, found in times.items():
            method, kind = chosen[name]
            with bench.applied(model, method):
                cache = DynamicCache(config=model.config) if kind == "dynamic" else bench.filled_cache(
                    model, method, kind, 0, length)
                with Stopwatch(args.device) as watch:
                    bench.prefill(model, cache, ids, args.chunk, label=f"prefill {name}")
            found.append(watch.seconds)
    return {name: summary(values) for name, values in times.items()}


def ratios(row: dict, weights: int) -> dict:
    """The ratios the targets name, from min and from median times."""
    decode = {name: setup["decode"] for name, setup in row["setups"].items()}
    out = {stat: {"preallocated_vs_dynamic": decode["stock"][stat] / decode["stock-preallocated"][stat]}
           for stat in ("min_s", "median_s")}
    dense = row["setups"]["dense"]
    for name, setup in row["setups"].items():
        if not name.startswith("duo-"):
            continue
        ideal = dense["bytes_per_step"] / setup["bytes_per_step"]
        for stat in ("min_s", "median_s"):
            speedup = decode["dense"][stat] / decode[name][stat]
            out[stat][name] = {"speedup_vs_dense": speedup, "ideal": ideal, "fraction_of_ideal": speedup / ideal,
                               "speedup_vs_stock": decode["stock"][stat] / decode[name][stat]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per setup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefill", action="store_true", help="also time the chunked prefill")
    parser.add_argument("--repeats", type=int, default=2, help="timed prefills per setup")
    parser.add_argument("--default-allocator", action="store_true", help="keep glibc's default malloc settings")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    bench.ensure_allocator(argv)
    model = bench.build_model(args)
    weights = sum(p.nbytes for p in model.parameters()) - model.model.embed_tokens.weight.nbytes  # one row read
    chosen = bench.setups(args, tuple(args.sparsities))
    record = bench.run_record(argv)
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, {args.dtype}, "
          f"weights read per step {weights / 2**20:.0f} MiB; sink {args.sink}, recent {args.recent}; "
          f"{record['torch_threads']} threads; allocator {record['allocator']}")
    rows = []
    for length in args.lengths:
        row = {"tokens": length, "setups": time_decode(model, chosen, length, args, weights)}
        if args.prefill:
            for name, times in time_prefill(model, chosen, length, args).items():
                row["setups"][name]["prefill"] = times
        row["ratios"] = ratios(row, weights)
        rows.append(row)
        print(f"\n{length} tokens: decode ms (min / median), MiB moved per step")
        for name, setup in row["setups"].items():
            prefill = f"  prefill {setup['prefill']['min_s']:.2f} s" if "prefill" in setup else ""
            print(f"  {name:>19} {setup['decode']['min_s'] * 1e3:8.1f} / {setup['decode']['median_s'] * 1e3:8.1f}"
                  f"  {setup['bytes_per_step'] / 2**20:8.1f}{prefill}")
        for stat in ("min_s", "median_s"):
            found = row["ratios"][stat]
            duo = "  ".join(f"{name}: {r['speedup_vs_dense']:.2f}x of ideal {r['ideal']:.2f}x = "
                            f"{r['fraction_of_ideal']:.0%} (vs stock {r['speedup_vs_stock']:.2f}x)"
                            for name, r in found.items() if name.startswith("duo-"))
            print(f"  [{stat[:-2]}] preallocated vs DynamicCache {found['preallocated_vs_dynamic']:.2f}x  {duo}")
    if args.json:
        from duokit.io import atomic_write_json

        atomic_write_json(args.json, {**record, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
