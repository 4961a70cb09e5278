"""Every DuoAttention head pattern of one sparsity on a small model: how good could a pattern be, and where
does a trained one rank (docs/duo_training.md "How far from the best pattern")?

    python benchmarks/duo_pattern_search.py --model needlenet --pattern runs/duo-needlenet/pattern \
        --frames 32 --sink 4 --recent 63 --per-task 32 --seed 7 --json runs/search.json

With L layers x H KV heads and S streaming heads there are C(L*H, S) binary patterns (70 for NeedleNet's
8 KV heads at 50%); each one is scored by the same held-out evaluation as `duo_training_evidence.py`
(fresh eval-split samples, prefix once + 4 tries, the `duo` method's split cache, 4-try circular
accuracy). Use a seed that is not the one the evidence reports on: picking the best pattern on a set and
reporting it on the same set would overstate it. `--workers` processes each load the model once.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

_worker: dict = {}


def _load(model_name: str, threads: int) -> None:
    import torch

    from duokit.models import load_vlm

    torch.set_num_threads(threads)
    model, _, adapter = load_vlm(model_name, dtype=torch.float32, device="cpu")
    _worker.update(model=model, adapter=adapter)


def _score(job: tuple[str | None, dict, dict]) -> dict:
    """4-try / 1-try accuracy and families of one pattern directory (None: the dense baseline)."""
    from duokit.methods import get_method
    from duokit.models.needlenet.config import ANSWER_PARSER
    from duokit.models.needlenet.evaluate import heldout_scores

    pattern, deploy, data = job
    method = get_method("baseline") if pattern is None else get_method("duo", pattern=pattern, **deploy)
    full = heldout_scores(_worker["model"], _worker["adapter"], ANSWER_PARSER, method=method, **data)
    return {"overall": full["overall"], "overall_1try": full["overall_1try"], "families": dict(full["families"])}


def binary_patterns(layers: int, kv_heads: int, streaming: int) -> list[np.ndarray]:
    """All layers x kv_heads 0/1 matrices with exactly `streaming` zeros, in itertools order."""
    patterns = []
    for chosen in itertools.combinations(range(layers * kv_heads), streaming):
        gates = np.ones(layers * kv_heads)
        gates[list(chosen)] = 0.0
        patterns.append(gates.reshape(layers, kv_heads))
    return patterns


def plot_search(accuracies: list[float], baseline: float, marks: dict[str, float], sparsity: float,
                path: Path) -> Path:
    from duokit.plots import new_figure, save_png

    figure = new_figure(4.8, 3.2)
    axes = figure.add_subplot()
    axes.hist(accuracies, bins=20, color="lightsteelblue", edgecolor="white")
    axes.axvline(baseline, color="gray", linestyle="--", label="dense baseline")
    for (label, value), color in zip(marks.items(), ("tab:red", "tab:green")):
        axes.axvline(value, color=color, label=label)
    axes.set_xlabel(f"4-try accuracy, {sparsity:.0%} streaming heads")
    axes.set_ylabel(f"patterns (of {len(accuracies)})")
    axes.legend(fontsize=7)
    return save_png(figure, path)


def main() -> None:
    from tqdm.auto import tqdm

    from duokit.io import atomic_write_json
    from duokit.methods.duo.pattern import binarize, load_pattern, save_pattern

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="needlenet")
    parser.add_argument("--pattern", default=None, help="a trained pattern directory to rank among all patterns")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=63, help="recent tokens before the query a streaming head keeps")
    parser.add_argument("--per-task", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7, help="held-out seed of the search set")
    parser.add_argument("--heldout-seed", type=int, default=None,
                        help="also score the baseline, the --top best patterns and the trained one on this seed")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot", default=None, help="histogram PNG (default: next to --json)")
    args = parser.parse_args()

    from transformers import AutoConfig

    from duokit.models import resolve_model_path

    text = AutoConfig.from_pretrained(resolve_model_path(args.model)).get_text_config()
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    streaming = round(args.sparsity * layers * kv_heads)
    deploy = {"sink": args.sink, "recent": args.recent, "sparsity": args.sparsity}
    data = {"frames": args.frames, "per_task": args.per_task, "seed": args.seed}
    patterns = binary_patterns(layers, kv_heads, streaming)
    if args.pattern:
        trained = load_pattern(args.pattern).gates
        trained_streaming = np.argwhere(~binarize(trained, args.sparsity)[0]).tolist()
    with tempfile.TemporaryDirectory() as scratch, \
            ProcessPoolExecutor(args.workers, initializer=_load, initargs=(args.model, 1)) as pool:
        paths = [str(save_pattern(Path(scratch) / f"p{k}", gates, args.sink, args.recent))
                 for k, gates in enumerate(patterns)]
        jobs = [(None, deploy, data)] + [(path, deploy, data) for path in paths]
        scores = list(tqdm(pool.map(_score, jobs), total=len(jobs), desc=f"{len(patterns)} patterns + baseline"))
        baseline, searched = scores[0], scores[1:]
        order = np.argsort([-s["overall"] for s in searched], kind="stable")
        if args.heldout_seed is not None:
            top = order[:args.top]
            heldout_jobs = [None] + [paths[k] for k in top] + ([args.pattern] if args.pattern else [])
            heldout = list(tqdm(pool.map(_score, [(p, deploy, {**data, "seed": args.heldout_seed})
                                                   for p in heldout_jobs]),
                                total=len(heldout_jobs), desc=f"held-out seed {args.heldout_seed}"))
    rows = [{"streaming_heads": np.argwhere(patterns[k] == 0).tolist(), **searched[k]} for k in order]
    result = {"settings": vars(args), "layers": layers, "kv_heads": kv_heads, "streaming_heads": streaming,
              "baseline": baseline, "patterns": rows}
    if args.heldout_seed is not None:
        labelled = [("baseline", None)] + [(f"search rank {i + 1}", rows[i]["streaming_heads"])
                                           for i in range(len(top))]
        labelled += [("trained", trained_streaming)] if args.pattern else []
        result["heldout"] = {label: {"streaming_heads": heads, "overall": h["overall"],
                                     "overall_1try": h["overall_1try"], "families": h["families"]}
                             for (label, heads), h in zip(labelled, heldout)}
    marks = {"best pattern": rows[0]["overall"]}
    if args.pattern:
        rank = next(i for i, row in enumerate(rows) if row["streaming_heads"] == trained_streaming)
        result["trained"] = {"pattern": args.pattern, "gates": trained.tolist(),
                             "streaming_heads": trained_streaming, "rank": rank + 1, **rows[rank]}
        marks = {f"trained (rank {rank + 1} of {len(rows)})": rows[rank]["overall"], **marks}
    atomic_write_json(args.json, result)
    plot = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")
    plot_search([r["overall"] for r in rows], baseline["overall"], marks, args.sparsity, plot)

    accuracies = np.array([r["overall"] for r in rows])
    print(f"baseline {baseline['overall']:.3f}; {len(rows)} patterns at {args.sparsity:.0%} streaming: "
          f"best {accuracies[0]:.3f} {rows[0]['streaming_heads']}, median {np.median(accuracies):.3f}, "
          f"worst {accuracies[-1]:.3f}; within 2 points of baseline: "
          f"{int((accuracies >= baseline['overall'] - 0.02).sum())}")
    if args.pattern:
        t = result["trained"]
        print(f"trained pattern {t['streaming_heads']}: {t['overall']:.3f}, rank {t['rank']} of {len(rows)}")
    for name, h in result.get("heldout", {}).items():
        print(f"held-out seed {args.heldout_seed}, {name}: {h['overall']:.3f} (1-try {h['overall_1try']:.3f})")
    print(f"wrote {args.json} and {plot}")


if __name__ == "__main__":
    main()
