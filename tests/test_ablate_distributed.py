"""`duokit ablate` spread over two CPU processes through the real `accelerate launch` entry point: whole
cells dealt out by predicted cost, the data set, the gates and the results made once by the main rank,
the same results and predictions as one process, and a killed rank that resumes (with 2 processes or
with 1) with nothing recomputed. Plus the cost rule and the refusal of a rank that cannot see DIR."""

from __future__ import annotations

import copy
import csv
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_distributed import TRIES_TOGETHER_COSTS, deterministic, launch

from duokit import ablate, eval_command
from duokit.ablate_config import parse_config
from duokit.distributed import World, shard_paths
from duokit.io import iter_jsonl
from duokit.runtime import torch_threads

# The smallest ablation that still has every shared step: a synthetic set (1 sample per sub-task: 9),
# DuoAttention gates trained once (1 step), and three cells, one of which needs the gates.
TINY = {
    "model": "needlenet", "data": {"synth": {"per_task": 1, "seed": 7}}, "frames": 32, "dtype": "float32",
    "device": "cpu", "prepare": {"duo_gates": {"steps": 1, "sink": 4, "recent": 16}},
    "rows": [
        {"name": "baseline", "method": "baseline"},
        {"name": "random_drop", "method": "random_drop", "budgets": [0.5]},
        {"name": "duo", "method": "duo", "settings": {"pattern": "@duo_gates", "sink": 4, "recent": 16},
         "budgets": [0.5]},
    ],
}
CELLS = ["cells/baseline/settings", "cells/random_drop/rho0.5", "cells/duo/rho0.5"]
# results.csv columns measured by the clock or the process (they differ between any two runs).
MEASURED_COLUMNS = {"prefill_s", "decode_s_per_token", "peak_growth_bytes_median"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process ablation, and its config file."""
    root = tmp_path_factory.mktemp("ablate-spread")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    # One torch thread, as in the launched processes (OMP_NUM_THREADS=1), so that the reference sums as
    # they do: a sum split over another number of threads (MKL may also use fewer than asked on a busy
    # machine) can differ in its last bits, enough to flip a near-tie between two answer tokens.
    with torch_threads(1):
        ablate.run_ablation(copy.deepcopy(TINY), root / "reference", progress=False)
    return root / "reference", config


def with_reference_data(reference: Path, run: Path) -> Path:
    """`run` holding a copy of the reference's synthetic set (found made, as on a resume; gates, cells and
    results are still to do). Copied, not synthesized again: with this PyAV/x264 a rewritten set is not
    byte-identical (later encodes of a process differ), and its pixels would not be the reference's."""
    shutil.copytree(reference / "data", run / "data")
    return run


def ablate_args(config: Path, run: Path) -> list[str]:
    return ["ablate", "--config", str(config), "--out", str(run)]


def cells_per_rank(stderr: str) -> dict[int, list[str]]:
    """{rank: the cells it took} from each rank's log line."""
    return {int(rank): folders.split() for rank, folders in re.findall(r"rank (\d+)/2 cells: \d+ of 3: (.*)", stderr)}


def records(run: Path, cell: str) -> list[dict]:
    return list(iter_jsonl(run / cell / "predictions.jsonl"))


def assert_same_ablation(run: Path, reference: Path, partly_redone: frozenset = frozenset()) -> None:
    """Every cell's records (up to order: a resumed cell appends what it redoes) and every results.csv row,
    measured columns aside, as the reference's; no shard left. `partly_redone`: (cell, sample) pairs of
    which only some tries were redone (their KV peak counts fewer tries decoded together)."""
    for cell in CELLS:
        position = {r["record_id"]: i for i, r in enumerate(records(reference, cell))}
        ours = sorted(records(run, cell), key=lambda r: position[r["record_id"]])
        assert ([deterministic(r, (cell, r["sample_id"]) in partly_redone) for r in ours]
                == [deterministic(r, (cell, r["sample_id"]) in partly_redone) for r in records(reference, cell)])
        assert shard_paths(run / cell) == []
    partial_cells = {cell for cell, _ in partly_redone}

    def rows(folder: Path) -> list[dict]:
        table = list(csv.DictReader((folder / "results.csv").open()))
        return [{k: v for k, v in row.items() if k not in MEASURED_COLUMNS
                 and not (f"cells/{row['row']}/{row['cell']}" in partial_cells and k in TRIES_TOGETHER_COSTS)}
                for row in table]

    assert rows(run) == rows(reference)


def logged_lines(run: Path) -> dict[str, list[str]]:
    return {cell: (run / cell / "predictions.jsonl").read_text().splitlines(keepends=True)
            for cell in CELLS if (run / cell / "predictions.jsonl").exists()}


def test_two_processes_spread_whole_cells_and_give_the_single_process_results(reference, tmp_path):
    reference, config = reference
    run = with_reference_data(reference, tmp_path / "run")
    result = launch(ablate_args(config, run), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    # Equal costs (9 samples x 69 tokens each) are dealt out in turn: every cell to exactly one rank.
    assert cells_per_rank(result.stderr) == {0: [CELLS[0], CELLS[2]], 1: [CELLS[1]]}
    assert_same_ablation(run, reference)
    # The gates were trained by the main rank (once: the reference's gates, the same seed and data).
    gates = "prepare/duo_gates/pattern/full_attention_heads.tsv"
    assert (run / gates).read_bytes() == (reference / gates).read_bytes()
    assert result.stdout.count("results.csv, results.json") == 1  # the main process reports, once
    for name in ("results.json", "results.md", "plots/accuracy_kv.png"):
        assert (run / name).is_file()


def test_a_killed_rank_resumes_with_nothing_recomputed_with_two_or_one_processes(reference, tmp_path, monkeypatch):
    reference, config = reference
    run = with_reference_data(reference, tmp_path / "run")
    killed = launch(ablate_args(config, run), processes=2, DUOKIT_KILL_AFTER="1:1")
    assert killed.returncode != 0
    assert not (run / "results.csv").exists()
    before = logged_lines(run)
    assert len(before[CELLS[1]]) == 4  # rank 1 died after one sample (4 tries) of its cell
    tries = {(cell, json.loads(line)["sample_id"]) for cell, lines in before.items() for line in lines}
    counts = Counter((cell, json.loads(line)["sample_id"]) for cell, lines in before.items() for line in lines)
    partial = frozenset(key for key in tries if counts[key] < 4)  # rank 0 may be stopped mid-sample
    samples = [r["sample_id"] for r in records(reference, CELLS[0])][::4]
    missing = sorted(sample for cell in CELLS for sample in samples if counts[(cell, sample)] < 4)
    again = tmp_path / "again"
    shutil.copytree(run, again)

    # Resumed with two processes: every line logged before the kill is kept, nothing is logged twice.
    resumed = launch(ablate_args(config, run), processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    taken = cells_per_rank(resumed.stderr)
    # No cell on both ranks, and every cell on one: the resume re-plans the whole ablation.
    assert set(taken) == {0, 1}
    assert not set(taken[0]) & set(taken[1])
    assert set(taken[0]) | set(taken[1]) == set(CELLS)
    assert_same_ablation(run, reference, partly_redone=partial)
    for cell, lines in before.items():
        assert set(lines) <= set(logged_lines(run)[cell])
        assert len(logged_lines(run)[cell]) == len(records(reference, cell))

    # Resumed by a plain single process: only the samples no log held are evaluated.
    evaluated = []
    evaluate = eval_command.evaluate_sample

    def counting(lm, method, sample, *args, **kwargs):
        evaluated.append(sample.sample_id)
        return evaluate(lm, method, sample, *args, **kwargs)

    monkeypatch.setattr(eval_command, "evaluate_sample", counting)
    with torch_threads(1):
        ablate.run_ablation(str(config), again, progress=False)
    assert sorted(evaluated) == missing
    assert_same_ablation(again, reference, partly_redone=partial)
    for cell, lines in before.items():
        assert set(lines) <= set(logged_lines(again)[cell])


def test_a_refusal_on_the_main_rank_stops_every_process_and_touches_no_cell(reference, tmp_path):
    """The main rank refuses a changed row before the first barrier; the launcher stops the rank waiting
    there (no hang), and the finished ablation is left as it was."""
    reference, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    changed = copy.deepcopy(TINY)
    changed["rows"][1]["settings"] = {"seed": 3}
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    result = launch(ablate_args(config, run), processes=2)
    assert result.returncode != 0
    assert result.stderr.count("these cells already ran with other settings: cells/random_drop/rho0.5") == 1
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


# ---------------------------------------------------------------------------------------------
# In one process: the cost rule, and a rank that does not see what the main rank made.

@dataclass(frozen=True)
class OtherRank(World):
    """Rank 1 of 2 whose barriers pass at once and whose broadcasts deliver `sent` (or its own value)."""

    sent: object = None

    def barrier(self) -> None:
        pass

    def broadcast(self, value):
        return self.sent if value is None else value


def test_cells_are_dealt_out_by_samples_left_times_prefix_tokens(reference, tmp_path):
    reference, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    cells, _, shape = ablate.plan(parse_config(copy.deepcopy(TINY)), run, progress=False, make=False)
    assert [cell.folder for cell in cells] == CELLS
    assert ablate.cell_costs(cells, run, shape) == [0.0, 0.0, 0.0]  # finished: only scored again
    log = run / CELLS[1] / "predictions.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:9]) + lines[9][:20])  # 2 samples and one try logged, a torn line
    tokens = shape.preprocessing(32, None)["tokens"].total
    assert tokens == 69
    costs = ablate.cell_costs(cells, run, shape)
    assert costs == [0.0, 7.0 * tokens, 0.0]  # 7 samples have a try missing
    plan = list(zip(CELLS, costs))
    # The costly cell alone on one rank, the two finished ones on the other.
    assert ablate.my_cells(OtherRank(rank=1, size=2, sent=plan), cells, run, shape) == [cells[0], cells[2]]
    assert ablate.my_cells(OtherRank(rank=0, size=2, sent=plan), cells, run, shape) == [cells[1]]
    with pytest.raises(ValueError, match="rank 1 expands other cells than the main process"):
        ablate.my_cells(OtherRank(rank=1, size=2, sent=plan[:2]), cells, run, shape)


def test_a_rank_that_does_not_see_the_main_ranks_work_stops_and_writes_nothing(reference, tmp_path):
    """A non-main rank never synthesizes or trains itself: what the main rank made must be there."""
    reference, _ = reference
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"data/annotations\.json is missing on a process other than the "
                                                r"main one.*filesystem every process sees"):
        ablate.run_ablation(copy.deepcopy(TINY), run, progress=False, world=OtherRank(rank=1, size=2))
    assert not run.exists()
    with_reference_data(reference, run)
    with pytest.raises(FileNotFoundError, match=r"prepare/duo_gates is missing on a process other than the main"):
        ablate.run_ablation(copy.deepcopy(TINY), run, progress=False, world=OtherRank(rank=1, size=2))
    assert sorted(path.name for path in run.iterdir()) == ["data"]
