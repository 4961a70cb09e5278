"""`duokit pattern show DIR [--sparsity S] [--per-layer] [--json]`: a pattern's gates and retrieval heads."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("pattern", help="inspect DuoAttention head patterns (official format)")
    actions = parser.add_subparsers(dest="pattern_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="gate summary and the retrieval heads chosen at a sparsity")
    show.add_argument("directory", help="pattern directory (full_attention_heads.tsv + config.json)")
    show.add_argument("--sparsity", type=float, default=0.5,
                      help="fraction of streaming KV heads, official global quantile rule (default 0.5)")
    show.add_argument("--per-layer", action="store_true", help="apply the quantile within each layer")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    show.set_defaults(func=show_pattern)


def summarize(directory: str, sparsity: float, per_layer: bool = False) -> dict:
    import numpy as np

    from duokit.methods.duo.pattern import binarize, load_pattern, retrieval_heads_per_layer

    pattern = load_pattern(directory)
    retrieval, achieved = binarize(pattern.gates, sparsity, per_layer=per_layer)
    gates = pattern.gates
    return {
        "directory": str(directory), "num_layers": gates.shape[0], "num_kv_heads": gates.shape[1],
        "sink_size": pattern.sink_size, "recent_size": pattern.recent_size,
        "gate_mean": float(gates.mean()), "gate_median": float(np.median(gates)),
        "gate_min": float(gates.min()), "gate_max": float(gates.max()),
        "fraction_above_half": float((gates > 0.5).mean()),
        "sparsity": sparsity, "per_layer": per_layer, "achieved_sparsity": achieved,
        "retrieval": retrieval_heads_per_layer(retrieval), "gates": gates.tolist(),
    }


def show_pattern(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.directory, args.sparsity, args.per_layer)
    except (FileNotFoundError, ValueError) as err:
        print(f"duokit pattern show: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{summary['directory']}: {summary['num_layers']} layers x {summary['num_kv_heads']} KV heads, "
          f"sink {summary['sink_size']}, recent {summary['recent_size']} (training values in config.json)")
    print(f"gates: mean {summary['gate_mean']:.3f}  median {summary['gate_median']:.3f}  "
          f"min {summary['gate_min']:.3f}  max {summary['gate_max']:.3f}  "
          f"> 0.5: {summary['fraction_above_half']:.1%}")
    rule = "per-layer" if args.per_layer else "global"
    print(f"sparsity {args.sparsity} ({rule} quantile) -> {summary['achieved_sparsity']:.1%} streaming heads")
    for layer, (gates, heads) in enumerate(zip(summary["gates"], summary["retrieval"])):
        row = " ".join(f"{gate:.2f}" for gate in gates)
        print(f"layer {layer:3d}  [{row}]  retrieval {heads}")
    return 0
