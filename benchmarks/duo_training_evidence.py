"""DuoAttention gates on NeedleNet: train them, then held-out accuracy at 0/25/50/75% streaming heads for
the trained pattern and for random patterns, against the dense baseline (docs/duo_training.md "Evidence").

    python benchmarks/duo_training_evidence.py --model needlenet --run runs/duo-needlenet \
        --frames 32 --sink 4 --recent 16 --steps 2000 --per-task 16 --json runs/duo-needlenet/evidence.json

Training data: NeedleNet's own task family from the synthesizer's *train* split (official prompts, the
gt option's text as the answer; duokit.models.needlenet.data.make_example), never VNBench and never the
eval split; the loss is on the hidden state that predicts the answer (`loss_positions="predicting"`:
NeedleNet answers are one word). Evaluation: fresh eval-split samples of every sub-task, the engine's
prefix-once/4-try greedy decoding with the `duo` method's split KV cache (streaming heads really keep
sink + recent tokens), the scorer's 4-try circular accuracy with NeedleNet's answer parser.

docs/duo_training.md's historical evidence (NeedleNet v1, the 8 / 8 variant and earlier; not the v2 runs)
predates the one meaning of `recent` (training then counted the query among its recent tokens): its
`--recent 16` is this script's `--recent 15`, its `--recent 64` this script's `--recent 63`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from pool_duo_evidence import accuracy_curves, pooled

SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "n/a"


def main() -> None:
    import torch

    from duokit.io import atomic_write_json
    from duokit.methods import get_method
    from duokit.methods.duo.pattern import load_pattern, save_pattern
    from duokit.methods.duo.train import TrainSettings, train_gates
    from duokit.methods.duo.train_plots import plot_accuracy_sparsity
    from duokit.models import load_vlm, resolve_model_path
    from duokit.models.needlenet.config import ANSWER_PARSER, FRAME_SIZE
    from duokit.models.needlenet.evaluate import heldout_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="needlenet")
    parser.add_argument("--run", required=True)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--random-patterns", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-seed", type=int, default=None,
                        help="seed of the held-out set (default --seed + 1); a finished --run is re-scored, not retrained")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    heldout_seed = args.seed + 1 if args.heldout_seed is None else args.heldout_seed
    torch.set_num_threads(1)

    settings = TrainSettings(model=args.model, steps=args.steps, save_every=50, sink=args.sink, recent=args.recent,
                             loss_positions="predicting", seed=args.seed, frames=(args.frames,),
                             frame_size=(FRAME_SIZE, FRAME_SIZE), device="cpu", dtype="float32")
    summary = train_gates(settings, args.run)  # NeedleNet's own task data (methods/duo/train.py::make_data)
    model, _, adapter = load_vlm(args.model, dtype=torch.float32, device="cpu")
    trained = load_pattern(Path(args.run) / "pattern").gates
    print(f"trained gates: mean {summary['gate_mean']:.3f}, min {summary['gate_min']:.3f}\n{np.round(trained, 3)}")

    def scores(method) -> dict:
        full = heldout_scores(model, adapter, ANSWER_PARSER, args.frames, args.per_task, heldout_seed,
                              progress=True, method=method)
        return {"overall": full["overall"], "overall_1try": full["overall_1try"],
                "families": dict(full["families"])}

    results = {"model_md5": md5(Path(resolve_model_path(args.model)) / "model.safetensors"),
               "settings": vars(args), "gates": trained.tolist(), "baseline": scores(get_method("baseline")),
               "trained": {}, "random": {}}
    deploy = {"sink": args.sink, "recent": args.recent}  # `recent` means the same in training and inference
    with tempfile.TemporaryDirectory() as scratch:
        randoms = []
        for k in range(args.random_patterns):
            path = Path(scratch) / f"random{k}"
            save_pattern(path, np.random.default_rng([args.seed, k]).random(trained.shape), args.sink, args.recent)
            randoms.append(path)
        for sparsity in SPARSITIES:
            pattern = str(Path(args.run) / "pattern")
            results["trained"][sparsity] = scores(get_method("duo", pattern=pattern, sparsity=sparsity, **deploy))
            results["random"][sparsity] = [scores(get_method("duo", pattern=str(p), sparsity=sparsity, **deploy))
                                           for p in randoms]
            random_mean = {key: float(np.mean([r[key] for r in results["random"][sparsity]]))
                           for key in ("overall", "overall_1try")}
            print(f"sparsity {sparsity:.2f} (4-try / 1-try): trained {results['trained'][sparsity]['overall']:.3f} / "
                  f"{results['trained'][sparsity]['overall_1try']:.3f}  random {random_mean['overall']:.3f} / "
                  f"{random_mean['overall_1try']:.3f}  baseline {results['baseline']['overall']:.3f} / "
                  f"{results['baseline']['overall_1try']:.3f}")
    one_set = pooled([results])
    plot_accuracy_sparsity(accuracy_curves(one_set), one_set["baseline"], Path(args.run) / "plots" / "accuracy_sparsity.png")
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
