"""Compare DuoAttention patterns trained with different settings on one NeedleNet held-out set.

    python benchmarks/duo_compare_patterns.py --model needlenet --frames 32 --per-task 4 --heldout-seed 21 \
        --sparsity 0.25 0.5 --pattern paper=runs/cmp-paper/pattern --pattern official=runs/cmp-official-teacher/pattern

For each pattern (a `train-duo` RUN/pattern folder): its gates, the gate ranking (heads from most to least
"retrieval"), and at each --sparsity the streaming heads the official rule picks (duokit.methods.duo.pattern
.binarize) and which of them differ from the first pattern's. Then the 4-try (and 1-try) accuracy of the dense
baseline and of every pattern at every sparsity on ONE fresh held-out set of the synthesizer's eval split
(NeedleNet's sub-tasks, never VNBench), deployed with each pattern's own sink/recent (or --sink/--recent).
Patterns that pick the same heads with the same window are scored once (the evaluation is deterministic).
A sample is 100 / (9 x --per-task) points: small sets separate only large differences.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_pattern(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--pattern wants NAME=DIR, got {text!r}")
    return name, Path(path)


def heads(mask) -> list[tuple[int, int]]:
    """(layer, KV head) of every True entry."""
    return [(int(layer), int(head)) for layer, head in zip(*mask.nonzero())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", type=parse_pattern, action="append", required=True, metavar="NAME=DIR",
                        help="a pattern folder (RUN/pattern); the first is the reference for 'differs'")
    parser.add_argument("--model", default="needlenet")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--heldout-seed", type=int, default=21)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--sink", type=int, default=None, help="deploy sink (default: each pattern's sink_size)")
    parser.add_argument("--recent", type=int, default=None, help="deploy recent (default: each pattern's)")
    parser.add_argument("--no-eval", action="store_true", help="compare the gates and chosen heads only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from duokit.io import atomic_write_json
    from duokit.methods.duo.pattern import binarize, load_pattern

    patterns = {name: load_pattern(path) for name, path in args.pattern}
    if len({p.shape for p in patterns.values()}) != 1:
        raise SystemExit(f"patterns of different shapes: { {n: p.shape for n, p in patterns.items()} }")
    reference = next(iter(patterns))
    report = {"settings": {k: v for k, v in vars(args).items() if k != "pattern"},
              "patterns": {name: str(path) for name, path in args.pattern}, "gates": {}, "streaming": {},
              "accuracy": {}}
    for name, pattern in patterns.items():
        gates = pattern.gates
        order = [f"L{layer}H{head}" for layer, head in zip(*np.unravel_index(np.argsort(-gates, axis=None,
                                                                                    kind="stable"), gates.shape))]
        report["gates"][name] = gates.tolist()
        print(f"{name}: gates (layers x KV heads) {np.round(gates, 3).tolist()}\n  ranking, most retrieval first: "
              f"{' '.join(order)}")
        if name != reference:
            print(f"  max |gate - {reference}|: {np.abs(gates - patterns[reference].gates).max():.3f}")
    for sparsity in args.sparsity:
        chosen = {name: ~binarize(p.gates, sparsity)[0] for name, p in patterns.items()}
        report["streaming"][sparsity] = {name: heads(mask) for name, mask in chosen.items()}
        for name, mask in chosen.items():
            differs = heads(mask & ~chosen[reference])
            note = "" if name == reference else (f"; differs from {reference}: +{differs} -"
                                                 f"{heads(chosen[reference] & ~mask)}" if differs else
                                                 f"; same heads as {reference}")
            print(f"sparsity {sparsity:.2f} {name}: streaming heads {heads(mask)}{note}")
    if not args.no_eval:
        from duokit.methods import get_method
        from duokit.models import load_vlm
        from duokit.models.needlenet.config import ANSWER_PARSER
        from duokit.models.needlenet.evaluate import heldout_scores

        torch.set_num_threads(1)
        model, _, adapter = load_vlm(args.model, dtype=torch.float32, device="cpu")

        def score(method) -> dict:
            full = heldout_scores(model, adapter, ANSWER_PARSER, args.frames, args.per_task, args.heldout_seed,
                                  method=method)
            return {"overall": full["overall"], "overall_1try": full["overall_1try"], "families": full["families"]}

        base = report["accuracy"]["baseline"] = score(get_method("baseline"))
        samples = 9 * args.per_task
        print(f"held-out: {samples} samples (eval split, seed {args.heldout_seed}, {args.frames} frames); "
              f"4-try (1-try); baseline {base['overall']:.3f} ({base['overall_1try']:.3f})")
        scored = {}
        for sparsity in args.sparsity:
            row = []
            for name, (_, path) in zip(patterns, args.pattern):
                pattern = patterns[name]
                window = (pattern.sink_size if args.sink is None else args.sink,
                          pattern.recent_size if args.recent is None else args.recent)
                key = (binarize(pattern.gates, sparsity)[0].tobytes(), window)
                if key not in scored:
                    scored[key] = score(get_method("duo", pattern=str(path), sparsity=sparsity, sink=window[0],
                                                   recent=window[1]))
                result = report["accuracy"].setdefault(name, {})[sparsity] = scored[key]
                row.append(f"{name} {result['overall']:.3f} ({result['overall_1try']:.3f})")
            print(f"sparsity {sparsity:.2f}: " + "  ".join(row))
    if args.json:
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
