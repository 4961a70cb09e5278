"""One torch thread in the test process, as in the processes the tests launch (OMP_NUM_THREADS=1)."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """One torch thread, as in the launched processes (OMP_NUM_THREADS=1), so that the reference sums as
    they do: a sum split over another number of threads (MKL may also use fewer than asked on a busy
    machine) can differ in its last bits, enough to flip a near-tie between two answer tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
