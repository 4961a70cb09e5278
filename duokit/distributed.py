"""Work spread over the processes of `accelerate launch` (docs/scaling.md).

A process started by a launcher (torchrun through `accelerate launch --multi_gpu`, or an MPI launcher)
learns its rank and the world size from accelerate's `PartialState`, which also joins the process group
(nccl on GPUs, gloo on CPU) used for the barriers. A plain process never imports accelerate: it is the
world of one.

Sharded `duokit eval`: each rank appends the records of its share of the samples to its own
`RUN/predictions.rank{R}-of-{N}.jsonl` (the name records the world size, so shards of runs launched with
different N never collide), and the main rank folds them into `RUN/predictions.jsonl` (`merge_shards`).
`split_by_cost` is the balancing rule, for anything that splits weighted work items across ranks:
`duokit ablate` uses it to deal out whole cells, each then run by one rank alone (`World.alone`).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# Where launchers put the world size: torchrun sets WORLD_SIZE; MPI launchers (accelerate's multi-CPU
# mode runs mpirun) set one of the others. accelerate.state reads the same variables.
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# How long a rank waits at a barrier for the others. The last sample of the slowest shard can take
# minutes on a long video, and torch's default (10 min for nccl) would abort a healthy run; a rank that
# dies is noticed by the launcher, which stops the others, so a long wait never hangs a broken run.
BARRIER_TIMEOUT = timedelta(hours=12)
# Fault injection for the tests: "RANK:K" makes the process of that launch rank SIGKILL itself right after
# logging K samples of a run (also of a cell it runs alone), the crash that a resumed run must recover
# from without recomputing or duplicating anything.
KILL_AFTER_ENV = "DUOKIT_KILL_AFTER"
SHARD_NAME = re.compile(r"predictions\.rank(\d+)-of-(\d+)\.jsonl")


def split_by_cost(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """The indices of `costs` each of `world_size` ranks takes, balanced by cost.

    Longest processing time first (Graham, "Bounds on multiprocessing timing anomalies", 1969): items in
    decreasing cost (ties: lower index first) each go to the rank with the least cost so far (ties: fewer
    items, then lower rank), which keeps the largest share within 4/3 of the best possible. Deterministic,
    so every rank computes the same split from the same costs; each rank's indices are ascending, so a
    rank works through its share in the list's order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for index, cost in enumerate(costs):
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost {index} must be a finite number >= 0, got {cost!r}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0.0, 0, rank) for rank in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, count, rank = heapq.heappop(heap)
        shares[rank].append(index)
        heapq.heappush(heap, (load + costs[index], count + 1, rank))
    return [sorted(share) for share in shares]


def launched_world_size() -> int:
    """The world size a launcher announced in the environment (1 for a plain process)."""
    for name in WORLD_SIZE_ENV:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return 1


def launched_rank() -> int:
    """This process's rank in the launch (0 for a plain process), read after `current_world`, which sets
    $RANK on MPI launches too."""
    return int(os.environ.get("RANK", "0") or 0) if launched_world_size() > 1 else 0


@dataclass(frozen=True)
class World:
    """This process's place among the launched processes; `World()` is a plain process."""

    rank: int = 0
    size: int = 1
    device: Any = None  # the device accelerate gives this rank (cuda:<local rank>, or cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def alone(self) -> World:
        """This process by itself, on its device: for work given whole to one rank (a `duokit ablate`
        cell spread by `share`), which must not wait for the other ranks."""
        return World(device=self.device)

    def broadcast(self, value: Any) -> Any:
        """`value` as the main rank has it, on every rank (picklable): what one rank read from the run
        directory, so that every rank decides from the same view of it (a shared filesystem may lag)."""
        if self.size == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def share(self, items: Sequence, costs: Sequence[float]) -> list:
        """This rank's items under `split_by_cost`, in the order of `items`."""
        if len(items) != len(costs):
            raise ValueError(f"{len(items)} items but {len(costs)} costs")
        return [items[i] for i in split_by_cost(costs, self.size)[self.rank]]

    def kill_point(self, done: int) -> None:
        """Die here if `$DUOKIT_KILL_AFTER` ("RANK:K") names this process's launch rank (that of a rank
        running a cell `alone` too) and `done` reached K (tests only)."""
        spec = os.environ.get(KILL_AFTER_ENV)
        if spec:
            rank, _, count = spec.partition(":")
            if int(rank) == launched_rank() and done >= int(count):
                os.kill(os.getpid(), signal.SIGKILL)


def log_line(line: str) -> None:
    """One line to stderr in one write. Ranks share the stream and stderr is unbuffered: `print` writes the
    text and its newline separately, so another rank's line could land inside ours (a write of under
    PIPE_BUF bytes to a pipe is atomic)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def current_world(cpu: bool = False) -> World:
    """The world of this process: `World()` unless a launcher started several processes, else rank,
    size and device from accelerate's `PartialState` (joining the process group). `cpu`, a set
    `$ACCELERATE_USE_CPU` or a machine without CUDA make it gloo on CPU: `accelerate launch --multi_gpu`
    spawns its N processes with torchrun even on a machine without a GPU (`--cpu` alone starts one
    process, unless MPI is set up)."""
    if launched_world_size() <= 1:
        return World()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    return World(state.process_index, state.num_processes, state.device)


def is_main_process() -> bool:
    """Whether this is rank 0 of a launch or a plain process (see `launched_rank`)."""
    return launched_rank() == 0


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    return Path(out) / f"predictions.rank{rank}-of-{world_size}.jsonl"


def shard_paths(out: str | os.PathLike) -> list[Path]:
    """The prediction shards in the run directory `out`, by world size then rank."""
    found = []
    for path in Path(out).glob("predictions.rank*-of-*.jsonl"):
        match = SHARD_NAME.fullmatch(path.name)
        if match:
            found.append(((int(match[2]), int(match[1])), path))
    return [path for _, path in sorted(found)]


def merge_shards(out: str | os.PathLike, order: Sequence[str], key: str = "record_id") -> int:
    """Fold every prediction shard of `out` into `out/predictions.jsonl`; returns how many there were.

    The merged file holds each record once (the first found: predictions.jsonl, then shards by world
    size and rank; a record is only ever logged by one rank, so a second copy can only come from a crash
    between the write below and the unlinks), sorted by `order` (the single-process order of the record
    ids; ids not in it keep their order, at the end). The lines are the shards' lines unchanged. The file
    is replaced atomically before the shards are removed, so a crash at any point loses nothing.
    """
    from duokit.io import JsonlLog, atomic_write_text

    shards = shard_paths(out)
    if not shards:
        return 0
    main = Path(out) / "predictions.jsonl"
    records: dict[str, dict] = {}
    for path in [main, *shards]:
        if path.exists():
            for record in JsonlLog(path, key=key).records:  # cuts a torn last line (a killed append)
                records.setdefault(str(record[key]), record)
    position = {str(record_id): index for index, record_id in enumerate(order)}
    merged = sorted(records.values(), key=lambda record: position.get(str(record[key]), len(position)))
    atomic_write_text(main, "".join(json.dumps(record) + "\n" for record in merged))
    for path in shards:
        path.unlink()
    return len(shards)
