"""DuoAttention memory: KV bytes held vs the analytic formula, and peak RSS vs fair baselines.

Variants: `stock` (transformers' sdpa + DynamicCache, what a user would run otherwise), `baseline`
(duokit's baseline method: sdpa + the preallocated cache the engine gives it, the fair baseline) and
`duo`. Each (variant, length) runs in a fresh subprocess, with glibc's mmap threshold at 64 KiB, so neither
another run nor the heap allocator's retained free blocks hide or inflate a peak. A run prefills `length` random tokens in chunks and decodes 4
tokens; peak memory is the RSS growth over the loaded model (duokit.metrics.PeakMemory).

    python benchmarks/duo_memory.py                      # default: 2k and 4k tokens (a few minutes on 2 cores)
    python benchmarks/duo_memory.py --lengths 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench

DECODE_TOKENS = 4


def measure(args: argparse.Namespace) -> dict:
    """One run in this process: the worker side."""

    from duokit.methods import get_method
    from duokit.metrics import PeakMemory, kv_cache_bytes

    model = bench.build_model(args)
    method = {"duo": bench.make_duo(args), "baseline": get_method("baseline"), "stock": None}[args.variant]
    ids = bench.token_ids(args.worker_length, args.vocab, args.device)
    memory = PeakMemory(args.device)
    with bench.applied(model, method), memory.measure():
        cache = bench.new_cache(model, method, args.worker_length, DECODE_TOKENS)
        token = bench.prefill(model, cache, ids, args.chunk).argmax(-1)
        for _ in range(DECODE_TOKENS):
            token = bench.decode_step(model, cache, token)
    tokens = args.worker_length + DECODE_TOKENS
    from duokit.models.base import TokenCounts

    formula = (method or get_method("baseline")).estimate_kv_bytes(bench.lm(model).geometry, TokenCounts(tokens))
    return {"variant": args.variant, "tokens": tokens, "kv_bytes": kv_cache_bytes(cache), "formula_bytes": formula,
            "peak_growth_bytes": memory.growth_bytes, "peak_exact": memory.exact,
            "weights_bytes": sum(p.nbytes for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--variant", choices=["stock", "baseline", "duo"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-length", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker_length:
        print(json.dumps(measure(args)))
        return 0
    passthrough = _without_option(argv, "--lengths", "--json")
    mib = 2**20
    print(f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} KV heads, "
          f"{args.dtype}; duo: sparsity {args.sparsity}, sink {args.sink}, recent {args.recent}; chunk {args.chunk}")
    print(f"{'tokens':>7} {'KV base MiB':>11} {'KV duo MiB':>10} {'formula':>8} {'KV ratio':>8} "
          f"{'peak stock MiB':>14} {'peak base MiB':>13} {'peak duo MiB':>12} {'peak ratio':>10}")
    rows = []
    for length in args.lengths:
        stock, base, duo = (bench.run_memory_worker(__file__, passthrough, variant, length) for variant in ("stock", "baseline", "duo"))
        exact = all(row["kv_bytes"] == row["formula_bytes"] for row in (stock, base, duo))
        rows.append({"stock": stock, "baseline": base, "duo": duo, "formula_exact": exact})
        print(f"{duo['tokens']:>7} {base['kv_bytes'] / mib:>11.1f} {duo['kv_bytes'] / mib:>10.1f} "
              f"{'exact' if exact else 'MISMATCH':>8} {base['kv_bytes'] / duo['kv_bytes']:>7.2f}x "
              f"{stock['peak_growth_bytes'] / mib:>14.1f} {base['peak_growth_bytes'] / mib:>13.1f} "
              f"{duo['peak_growth_bytes'] / mib:>12.1f} "
              f"{base['peak_growth_bytes'] / max(duo['peak_growth_bytes'], 1):>9.2f}x")
    if args.json:
        from duokit.io import atomic_write_json

        atomic_write_json(args.json, {**bench.run_record(argv), "rows": rows})
    return 0 if all(row["formula_exact"] for row in rows) else 1


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
