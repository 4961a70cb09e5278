"""Pool `duo_training_evidence.py` results of one trained pattern over several held-out sets.

Each JSON is one run of the evidence script on a different `--heldout-seed` (same model, pattern, window
and `--per-task`, so every set has the same size and the pooled accuracy is the mean of the sets'). Prints
per-set and pooled 4-try accuracy against the dense baseline, and plots the pooled accuracy–sparsity curve.

    python benchmarks/pool_duo_evidence.py runs/evidence_seed1.json runs/evidence_seed7.json \
        --plot runs/accuracy_sparsity_pooled.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def pooled(results: list[dict]) -> dict:
    """Mean 4-try accuracy over the sets: baseline, trained and mean-of-random per sparsity."""
    sparsities = sorted(results[0]["trained"], key=float)
    return {
        "baseline": float(np.mean([r["baseline"]["overall"] for r in results])),
        "trained": {s: float(np.mean([r["trained"][s]["overall"] for r in results])) for s in sparsities},
        "random": {s: float(np.mean([np.mean([x["overall"] for x in r["random"][s]]) for r in results]))
                   for s in sparsities},
    }


def accuracy_curves(pool: dict) -> dict[str, dict[float, float]]:
    """`pooled`'s trained and random accuracies as `plot_accuracy_sparsity` curves."""
    return {"trained gates": {float(s): v for s, v in pool["trained"].items()},
            "random gates (mean)": {float(s): v for s, v in pool["random"].items()}}


def main() -> None:
    from duokit.methods.duo.train_plots import plot_accuracy_sparsity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="evidence JSONs, one per held-out set")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    results = [json.loads(Path(path).read_text()) for path in args.results]
    same = {(r["model_md5"], str(r["gates"]), r["settings"]["per_task"], r["settings"]["recent"]) for r in results}
    if len(same) != 1:
        raise SystemExit(f"{args.results}: the runs differ in model, gates, --per-task or window; pool one setting only")
    for path, result in zip(args.results, results):
        seed = result["settings"].get("heldout_seed")
        seed = result["settings"]["seed"] + 1 if seed is None else seed  # runs before --heldout-seed existed
        line = "  ".join(f"{float(s):.2f}: {t['overall']:.3f}" for s, t in result["trained"].items())
        print(f"{Path(path).name} (held-out seed {seed}): baseline {result['baseline']['overall']:.3f}  trained {line}")
    pool = pooled(results)
    print(f"pooled over {len(results)} sets: baseline {pool['baseline']:.3f}")
    for s in pool["trained"]:
        print(f"  {float(s):.2f} streaming: trained {pool['trained'][s]:.3f} "
              f"({100 * (pool['trained'][s] - pool['baseline']):+.1f} points)  random {pool['random'][s]:.3f} "
              f"({100 * (pool['random'][s] - pool['baseline']):+.1f})")
    if args.plot:
        print(plot_accuracy_sparsity(accuracy_curves(pool), pool["baseline"], Path(args.plot)))


if __name__ == "__main__":
    main()
