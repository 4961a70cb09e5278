"""The NeedleNet comparison of docs/results.md: `duokit ablate --example cpu` on a larger, fresh held-out set.

    python benchmarks/ablation_results.py --out runs/ablate-results --doc docs/results.md

Runs (or resumes) the CPU example config with `--per-task` samples per sub-task (default 16: 144 samples)
of a synthetic held-out set drawn with `--data-seed` (default 11, unused by any other measurement in the
docs), then
writes the measured part of the results page: the command, the date, the table with each cell's 95%
Wilson interval of the 4-try accuracy, and the four plots copied next to it (docs/results/*.png). The
reading of the numbers is written by hand below the generated part.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

import yaml

from duokit.ablate import example_text, run_ablation
from duokit.io import atomic_write_text
from duokit.report import ABLATION_PLOTS, ablation_markdown


def config(per_task: int, data_seed: int) -> dict:
    raw = yaml.safe_load(example_text("cpu"))
    raw["data"] = {"synth": {"per_task": per_task, "seed": data_seed}}
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the ablation's directory (resumable)")
    parser.add_argument("--doc", default="docs/results.md", help="the results page to write")
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=11)
    args = parser.parse_args(argv)
    results = run_ablation(config(args.per_task, args.data_seed), args.out)
    doc = Path(args.doc)
    figures = doc.parent / doc.stem
    for name in ABLATION_PLOTS:
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / "plots" / f"{name}.png", figures / f"{name}.png")
    command = " ".join(["python", "benchmarks/ablation_results.py", *(argv if argv is not None else sys.argv[1:])])
    intro = (f"Measured {datetime.date.today().isoformat()} with `{command}` (`duokit ablate --example cpu` on "
             f"{args.per_task} samples per sub-task of a fresh synthetic held-out set, data seed {args.data_seed}). "
             "The 95% CI is the Wilson interval of the 4-try accuracy over the samples: two cells whose intervals "
             "overlap widely are not distinguished by this set.")
    table = ablation_markdown("Results: five methods and their controls on NeedleNet", intro, results["cells"])
    atomic_write_text(doc, table.replace("](plots/", f"]({figures.name}/"))
    print(f"wrote {doc} and {figures}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
