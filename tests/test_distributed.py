"""Sharded `duokit eval` through the real `accelerate launch` entry point, two CPU processes on gloo:
the same records and scores as one process, and a killed rank that resumes, with the same or another
number of processes, with nothing recomputed or duplicated. Plus the balancing rule and the shard merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_engine import eval_args, write_dataset

from duokit.cli import main
from duokit.distributed import (
    World,
    launched_world_size,
    merge_shards,
    shard_path,
    shard_paths,
    split_by_cost,
)
from duokit.eval_command import run_eval
from duokit.io import iter_jsonl
from duokit.runtime import torch_threads

ROOT = Path(__file__).resolve().parents[1]
# One launch loads torch and the tiny model in each process: ~40 s on a loaded 2-core machine. A hung
# process group must fail the test, never the suite.
LAUNCH_TIMEOUT = 300
LAUNCH_MARKER = "DUOKIT_TEST_LAUNCH"
# What a launcher sets; a test run inside a launched job must not leak them into the launches.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "ACCELERATE_USE_CPU")


# ---------------------------------------------------------------------------------------------
# The balancing rule.

def test_split_by_cost_balances_longest_first():
    costs = [5, 1, 4, 3, 3, 2, 2]  # total 20
    shares = split_by_cost(costs, 2)
    assert shares == [[0, 4, 6], [1, 2, 3, 5]]  # 5+3+2 = 10 and 1+4+3+2 = 10
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert split_by_cost(costs, 1) == [list(range(len(costs)))]
    # Split by position, the first half would hold 12 of 22: the rule is not a split by position.
    assert max(sum(costs[i] for i in share) for share in split_by_cost([9, 1, 1, 1, 8, 1, 1], 2)) == 11


def test_split_by_cost_spreads_equal_and_zero_costs_round_robin():
    assert split_by_cost([0.0] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert split_by_cost([7.0] * 5, 3) == [[0, 3], [1, 4], [2]]
    assert split_by_cost([1.0, 2.0], 4) == [[1], [0], [], []]  # more ranks than items


@pytest.mark.parametrize("costs, size, message", [
    ([1.0], 0, "world_size must be >= 1"),
    ([1.0, -2.0], 2, "cost 1 must be a finite number >= 0"),
    ([float("nan")], 2, "cost 0 must be"),
])
def test_split_by_cost_refuses_bad_input(costs, size, message):
    with pytest.raises(ValueError, match=message):
        split_by_cost(costs, size)


def test_world_share_and_the_plain_world(monkeypatch):
    items = ["a", "b", "c", "d"]
    assert World(rank=1, size=2).share(items, [1, 4, 2, 3]) == ["c", "d"]  # 2+3 vs 1+4 on rank 0
    with pytest.raises(ValueError, match="4 items but 3 costs"):
        World(rank=0, size=2).share(items, [1, 2, 3])
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")  # an MPI launch
    assert launched_world_size() == 3


LOG_WRITER = """
import sys, time
from pathlib import Path
from duokit.distributed import log_line

rank, folder = sys.argv[1], Path(sys.argv[2])
(folder / f"ready{rank}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
end = time.monotonic() + 0.5
while time.monotonic() < end:
    log_line(f"rank {rank}/2 cells: " + "x" * 40)
"""


def test_log_lines_of_two_processes_on_one_stream_never_interleave(tmp_path):
    """Two ranks logging at once to one pipe for half a second: every line arrives whole. (With `print`,
    which writes the newline separately, thousands of lines came out mangled in this test.)"""
    read, write = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", LOG_WRITER, str(rank), str(tmp_path)], cwd=ROOT,
                                stderr=write) for rank in (0, 1)]
    os.close(write)
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert all(w.poll() is None for w in writers), "a writer died before writing"
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start writing together
    with os.fdopen(read) as stream:
        lines = Counter(stream.read().splitlines())
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    assert set(lines) == {f"rank {rank}/2 cells: " + "x" * 40 for rank in (0, 1)}, list(lines)[:5]


# ---------------------------------------------------------------------------------------------
# The merge.

def record(record_id: str, value: int) -> dict:
    return {"record_id": record_id, "sample_id": record_id[:-2], "value": value}


def write_lines(path: Path, records: list[dict], torn: str = "") -> list[str]:
    lines = [json.dumps(r) + "\n" for r in records]
    path.write_text("".join(lines) + torn)
    return lines


def test_merge_folds_shards_of_any_world_size_in_single_process_order(tmp_path):
    order = [f"s{s}_{t}" for s in range(4) for t in range(2)]
    main_lines = write_lines(tmp_path / "predictions.jsonl", [record("s3_1", 0), record("s0_0", 0)])
    a = write_lines(shard_path(tmp_path, 1, 2), [record("s2_0", 1), record("s2_1", 1)],
                    torn='{"record_id": "s1_0", "val')  # killed mid-append: the torn line is dropped
    b = write_lines(shard_path(tmp_path, 0, 3), [record("s0_1", 2), record("s1_1", 2), record("x_0", 2)])
    # A copy already merged (a crash between the merge and the removal of the shards) is kept once.
    c = write_lines(shard_path(tmp_path, 2, 3), [record("s3_1", 9), record("s3_0", 3)])
    (tmp_path / "predictions.rank0-of-2.jsonl.tmp").write_text("not a shard")
    assert [p.name for p in shard_paths(tmp_path)] == [
        "predictions.rank1-of-2.jsonl", "predictions.rank0-of-3.jsonl", "predictions.rank2-of-3.jsonl"]

    assert merge_shards(tmp_path, order) == 3
    merged = (tmp_path / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert merged == [main_lines[1], b[0], b[1], a[0], a[1], c[1], main_lines[0], b[2]]
    assert shard_paths(tmp_path) == []
    assert merge_shards(tmp_path, order) == 0  # nothing to merge: the file is left alone
    assert (tmp_path / "predictions.jsonl").read_text().splitlines(keepends=True) == merged


def test_merge_names_a_bad_shard(tmp_path):
    (shard_path(tmp_path, 0, 2)).write_text('{"record_id": "a_0"}\nnot json\n{"record_id": "a_1"}\n')
    with pytest.raises(ValueError, match=r"predictions\.rank0-of-2\.jsonl, line 2"):
        merge_shards(tmp_path, ["a_0", "a_1"])
    assert shard_paths(tmp_path) and not (tmp_path / "predictions.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# `accelerate launch -m duokit eval` end to end.

def measured(key: str) -> bool:
    """Cost keys measured by the clock or the process (they differ between any two runs)."""
    key = key.removesuffix("_max")
    return key.endswith(("_s", "_s_per_token")) or key.startswith("peak_memory")


# The KV peak of tries decoded together grows with their number: a sample whose missing tries were redone
# alone has a smaller (correctly measured and planned) peak than when all 4 ran together.
TRIES_TOGETHER_COSTS = ("kv_bytes_peak", "kv_bytes_planned")


def deterministic(record: dict, partly_redone: bool = False) -> dict:
    def kept(key: str) -> bool:
        return not measured(key) and not (partly_redone and key.removesuffix("_max") in TRIES_TOGETHER_COSTS)

    return {**record, "cost": {k: v for k, v in (record.get("cost") or {}).items() if kept(k)}}


def assert_same_run(run: Path, reference: Path, ordered: bool = True, partly_redone: frozenset = frozenset()) -> None:
    """Same records (in the same order, if `ordered`) and the same scores as `reference`, no shard left
    behind. A single process appends what it redoes at the end of the file, so a run it resumed is only
    the same up to order; a sharded run always leaves the single-process order. `partly_redone`: samples
    of which only some tries were redone (their KV peak counts fewer tries decoded together)."""
    ours, theirs = (list(iter_jsonl(r / "predictions.jsonl")) for r in (run, reference))
    if not ordered:
        position = {r["record_id"]: i for i, r in enumerate(theirs)}
        ours = sorted(ours, key=lambda r: position.get(r["record_id"], len(position)))
    assert ([deterministic(r, r["sample_id"] in partly_redone) for r in ours]
            == [deterministic(r, r["sample_id"] in partly_redone) for r in theirs])
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["scores"] == expected["scores"]
    assert (deterministic(summary, bool(partly_redone))["cost"]
            == deterministic(expected, bool(partly_redone))["cost"])
    assert summary["config"] == expected["config"]
    assert shard_paths(run) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], processes: int, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m duokit ARGS` on CPU: torchrun spawns the N
    processes (accelerate's `--cpu` mode would start one without MPI), duokit joins them with gloo.
    Launched again once if another process took the free port before torchrun's store bound it (no rank
    has started then)."""
    result = launch_once(args, processes, **env)
    if result.returncode != 0 and "EADDRINUSE" in result.stderr:
        result = launch_once(args, processes, **env)
    return result


def launch_once(args: list[str], processes: int, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    environment.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env)
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "duokit", *args]
    marker = f"{os.getpid()}-{free_port()}"
    environment[LAUNCH_MARKER] = marker  # inherited by every rank, to find them if the launch hangs
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_launch(process, marker)
        out, err = process.communicate()
        pytest.fail(f"accelerate launch hung for {LAUNCH_TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def stop_launch(process: subprocess.Popen, marker: str) -> None:
    """Stop a hung launch: SIGTERM makes torchrun stop its ranks; ranks that survive it (torchrun starts
    each in its own session, out of reach of the launcher's process group) are found by the marker."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{LAUNCH_MARKER}={marker}".encode() in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read


def cpu_eval_args(annotations, videos, run) -> list[str]:
    return [*eval_args(annotations, videos, run), "--device", "cpu"]


def samples_per_rank(stderr: str) -> list[tuple[int, int, int]]:
    """(rank, samples it took, samples left to do) from each rank's log line."""
    found = re.findall(r"rank (\d+)/\d+ on \S+: (\d+) of (\d+) samples", stderr)
    return sorted((int(rank), int(mine), int(todo)) for rank, mine, todo in found)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The in-process runs (the reference, the resumes) sum as the launched ranks do (OMP_NUM_THREADS=1): a
    sum split over another number of threads can differ in its last bits, enough to flip a near-tie."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The dataset of tests/test_engine.py (two decodable videos, a missing and a corrupt one) and its
    single-process run, the reference."""
    root = tmp_path_factory.mktemp("sharded")
    annotations, videos = write_dataset(root)
    reference = root / "reference"
    assert main(cpu_eval_args(annotations, videos, reference)) == 0
    return annotations, videos, reference


def test_two_processes_give_the_single_process_run(dataset, tmp_path):
    annotations, videos, reference = dataset
    run = tmp_path / "run"
    result = launch(cpu_eval_args(annotations, videos, run), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run, reference)
    assert samples_per_rank(result.stderr) == [(0, 2, 4), (1, 2, 4)]
    assert result.stdout.count("Overall") == 1  # the main process reports, once


def test_a_killed_rank_resumes_with_nothing_recomputed_under_any_world_size(dataset, tmp_path, monkeypatch):
    annotations, videos, reference = dataset
    run = tmp_path / "run"
    killed = launch(cpu_eval_args(annotations, videos, run), processes=2, DUOKIT_KILL_AFTER="1:1")
    assert killed.returncode != 0
    assert not (run / "predictions.jsonl").exists()  # never merged
    lines = {path.name: path.read_text().splitlines(keepends=True) for path in shard_paths(run)}
    rank1 = [json.loads(line) for line in lines["predictions.rank1-of-2.jsonl"]]
    assert len(rank1) == 4 and len({r["sample_id"] for r in rank1}) == 1  # rank 1 died after one sample
    logged = [line for shard in lines.values() for line in shard]
    tries = Counter(json.loads(line)["sample_id"] for line in logged)
    done = {sample for sample, count in tries.items() if count == 4}  # rank 0 may be stopped mid-sample
    partial = frozenset(tries) - done
    again = tmp_path / "again"
    shutil.copytree(run, again)

    # Resumed with two processes: only the samples no shard holds are shared out, and every line logged
    # before the kill is in the merged file unchanged.
    resumed = launch(cpu_eval_args(annotations, videos, run), processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {todo for _, _, todo in samples_per_rank(resumed.stderr)} == {4 - len(done)}
    assert_same_run(run, reference, partly_redone=partial)
    assert set(logged) <= set((run / "predictions.jsonl").read_text().splitlines(keepends=True))

    # Resumed by a plain single process (another world size): the shards count as done too.
    from duokit import eval_command

    evaluated = []
    evaluate = eval_command.evaluate_sample

    def counting(lm, method, sample, *args, **kwargs):
        evaluated.append(sample.sample_id)
        return evaluate(lm, method, sample, *args, **kwargs)

    monkeypatch.setattr(eval_command, "evaluate_sample", counting)
    assert main(cpu_eval_args(annotations, videos, again)) == 0
    all_samples = {r["sample_id"] for r in iter_jsonl(reference / "predictions.jsonl")}
    assert sorted(evaluated) == sorted(all_samples - done)
    assert_same_run(again, reference, ordered=False, partly_redone=partial)
    assert set(logged) <= set((again / "predictions.jsonl").read_text().splitlines(keepends=True))


def test_a_single_process_run_resumes_under_two_processes(dataset, tmp_path):
    """A partly logged single-process run (one sample with two tries missing, one sample missing):
    two processes redo only those, in the single-process order."""
    annotations, videos, reference = dataset
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines
            if json.loads(line)["record_id"] not in ("h0_ret_edit1_2", "h0_ret_edit1_3")
            and json.loads(line)["sample_id"] != "h1_cnt_insert1"]
    (run / "predictions.jsonl").write_text("".join(kept))
    result = launch(cpu_eval_args(annotations, videos, run), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert samples_per_rank(result.stderr) == [(0, 1, 2), (1, 1, 2)]
    assert_same_run(run, reference, partly_redone=frozenset({"h0_ret_edit1"}))
    assert set(kept) <= set((run / "predictions.jsonl").read_text().splitlines(keepends=True))


def test_a_process_of_a_launched_job_can_run_a_whole_run_alone(dataset, tmp_path, monkeypatch):
    """What `duokit ablate` does with a cell it was given whole: `world.alone()` runs it in this process,
    never waiting for the other ranks (here there are none: joining the group would fail at once)."""
    annotations, videos, reference = dataset
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run / "predictions.jsonl").write_text("".join(lines[4:]))  # h0 to redo
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    summary = run_eval(annotations, videos, 4, run, model="tiny:qwen2_5_vl", chunk_size=32, device="cpu",
                       world=World(rank=1, size=2, device="cpu").alone())
    assert shard_paths(run) == []
    assert summary == json.loads((run / "summary.json").read_text())
    assert [deterministic(r) for r in iter_jsonl(run / "predictions.jsonl")][12:] == [
        deterministic(r) for r in iter_jsonl(reference / "predictions.jsonl")][:4]


def test_predicted_costs_rank_by_tokens_then_duration():
    """Tokens from the planner once per frame size; the duration only orders equal token counts."""
    from types import SimpleNamespace

    from duokit.eval_command import predicted_costs

    def sample(video, length):
        return SimpleNamespace(video_name=video, tries=(SimpleNamespace(length=length),))

    samples = [sample("a", 30.0), sample("b", 120.0), sample("c", 60.0), sample("gone", 180.0), sample("d", 10.0)]
    sizes = {"a": (360, 640), "b": (360, 640), "c": (360, 640), "d": (720, 1280)}
    asked = []

    def plan_tokens(height, width):
        asked.append((height, width))
        return height * width // 1000

    costs = predicted_costs(samples, sizes, plan_tokens)
    assert asked == [(360, 640), (720, 1280)]
    assert costs == [230 + 30 / 180, 230 + 120 / 180, 230 + 60 / 180, 0.0, 921 + 10 / 180]
    # The big-frame video balances the three others; among equal tokens the longest goes first.
    assert split_by_cost(costs, 2) == [[4], [0, 1, 2, 3]]
    assert split_by_cost(costs[:3], 2) == [[1], [0, 2]]  # 120 s alone, 30 + 60 s together


def test_only_rank_0_of_a_launch_reports(monkeypatch):
    from duokit.distributed import is_main_process

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")  # set by something else: a plain process still reports
    assert is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
