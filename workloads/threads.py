"""How many intra-op threads torch uses in a run: as many as the CPUs the run owns, said in one line.

A thread more than the run's CPUs makes torch's workers wait on each other at every step (on a shared 2-core
machine an epoch took 0.2 to 3 s with 2 threads against 0.3 s with 1). Ray sets OMP_NUM_THREADS for a task,
but a reused worker process keeps the thread count of the first task that imported torch in it, so the count
is set here, explicitly, at the start of every run.
"""
from __future__ import annotations

import math
import os

import torch

from workloads.config import ConfigError

ENV = "CLORCH_THREADS"  # overrides the count in `clorch run` (a trial follows its Ray reservation)


def own_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_for(reserved_cpus: float | None = None) -> tuple[int, str]:
    """(threads, why): one per CPU Ray reserved (`reserved_cpus`, at least one), else CLORCH_THREADS where
    set, else one per CPU of this process's affinity."""
    if reserved_cpus is not None:
        n = max(1, math.floor(reserved_cpus))  # a fraction of a CPU still needs a thread
        return n, f"Ray reservation: {reserved_cpus:g} CPU"
    value = os.environ.get(ENV)
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"{ENV}: {value!r} is not a thread count; accepted: a positive integer, or unset "
                              f"(one thread per CPU this process may use)")
        return int(value), f"{ENV}={int(value)}"
    n = own_cpus()
    return n, f"CPUs this process may use: {n}"


def use_threads(reserved_cpus: float | None = None) -> str:
    """Set torch's intra-op thread count as `threads_for` says; returns the line that says it."""
    n, why = threads_for(reserved_cpus)
    torch.set_num_threads(n)
    return f"torch threads: {torch.get_num_threads()} ({why})"
