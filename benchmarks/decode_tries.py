"""The 4 tries of a sample decoded together vs one after the other, on one prefilled prefix (docs/decoding.md).

The benchmark model of benchmarks/_duo_bench.py with a prefix of `--tokens` random KV tokens in the
default preallocated cache; 4 suffixes of random ids (lengths `--suffix` + 0..3, as option orders
differ slightly), `--new-tokens` greedy tokens each (EOS disabled, so every try decodes them all).
`sequential`: each try after the in-place restore of the prefix (the engine's path);
`sequential_copy`: each try on a deepcopy of the prefilled cache (the engine before); `together`:
`duokit.decode_together.decode_tries_together`. The variants are interleaved over `--repeats`; min
and median are reported, and the tokens of `together` must equal `sequential`'s. The script re-runs
itself with MALLOC_MMAP_MAX_=0 unless given --default-allocator (see benchmarks/duo_speed.py).

    python benchmarks/decode_tries.py --tokens 16384 --threads 1 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _duo_bench as bench
import torch

TRIES = 4


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, default=4096, help="prefix (context) tokens")
    parser.add_argument("--suffix", type=int, default=60, help="suffix tokens of the shortest try")
    parser.add_argument("--new-tokens", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-allocator", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object (last line)")
    args = parser.parse_args(argv)
    bench.ensure_allocator(argv)

    from duokit.decode_together import decode_tries_together
    from duokit.engine import greedy_decode
    from duokit.methods import get_method
    from duokit.metrics import Stopwatch

    model = bench.build_model(args)
    model.generation_config.eos_token_id = [args.vocab]  # never produced: every try decodes --new-tokens
    lm, method = bench.lm(model), get_method("baseline")
    generator = torch.Generator().manual_seed(2)
    suffixes = [torch.randint(0, args.vocab, (1, args.suffix + i), generator=generator).to(args.device)
                for i in range(TRIES)]
    reserve = args.suffix + TRIES - 1 + args.new_tokens
    cache = bench.filled_cache(model, None, "preallocated", args.tokens, reserve)
    prefix = SimpleNamespace(next_position=args.tokens)
    restore = cache.prefix_restorer()

    def sequential():
        return [greedy_decode(lm, restore(), prefix, suffix, args.new_tokens) for suffix in suffixes]

    def sequential_copy():
        return [greedy_decode(lm, copy.deepcopy(cache), prefix, suffix, args.new_tokens) for suffix in suffixes]

    def together():
        return decode_tries_together(lm, cache, prefix, suffixes, args.new_tokens)

    variants = {"sequential": sequential, "sequential_copy": sequential_copy, "together": together}
    times, tokens = {name: [] for name in variants}, {}
    with method.apply(model, lm.adapter):
        for _ in range(args.repeats):
            for name, run in variants.items():
                with Stopwatch(args.device) as watch:
                    tokens[name] = run()
                times[name].append(watch.seconds)
                restore()
    result = {**bench.run_record(argv), "tokens": args.tokens, "tries": TRIES, "new_tokens": args.new_tokens,
              "suffix_tokens": [s.shape[1] for s in suffixes],
              "together_s": min(times["together"]), "sequential_s": min(times["sequential"]),
              "sequential_copy_s": min(times["sequential_copy"]),
              "together_s_median": statistics.median(times["together"]),
              "sequential_s_median": statistics.median(times["sequential"]),
              "sequential_copy_s_median": statistics.median(times["sequential_copy"]),
              "tokens_equal": tokens["together"] == tokens["sequential"] == tokens["sequential_copy"]}
    result["speedup"] = result["sequential_s"] / result["together_s"]
    result["speedup_median"] = result["sequential_s_median"] / result["together_s_median"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.tokens} prefix tokens, {TRIES} tries x {args.new_tokens} new tokens: together "
              f"{result['together_s']:.2f} s, sequential {result['sequential_s']:.2f} s (with a copy per try "
              f"{result['sequential_copy_s']:.2f} s): {result['speedup']:.2f}x (median {result['speedup_median']:.2f}x); "
              f"tokens equal: {result['tokens_equal']}")
    return 0 if result["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
