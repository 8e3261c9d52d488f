"""What the compiled (numba) CPU loops share: a thread pool to run independent parts of one call at once.

The loops release the GIL, so parts run on Python threads truly in parallel. The pool has one thread fewer than
torch's intra-op thread count (the calling thread runs a part itself), so a run uses as many cores as torch is
allowed (workloads.threads sizes that to the CPUs the run owns). A forked child makes a pool of its own.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (threads, pid) the pool was made for


def threads() -> int:
    """How many parts a call may run at once: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def run_parts(part: Callable[[int], None], parts: int) -> None:
    """part(0), ..., part(parts - 1), at once: part 0 on this thread, the others on the pool; raises the first
    error of a part once all have ended."""
    global _pool, _pool_key
    if parts <= 1:
        part(0)
        return
    if _pool is None or _pool_key != (parts, os.getpid()):
        if _pool is not None and _pool_key[1] == os.getpid():
            _pool.shutdown()
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="clorch-compiled")
        _pool_key = (parts, os.getpid())
    futures = [_pool.submit(part, t) for t in range(1, parts)]
    try:
        part(0)
    finally:  # every part has ended before this returns or raises: none still writes what the caller reuses
        for f in futures:
            f.exception()
    for f in futures:
        f.result()  # raises a part's error


def run_ranges(part: Callable[[int, int], None], n: int, parts: int) -> None:
    """part(lo, hi) for `parts` contiguous ranges splitting 0..n-1, at once (as run_parts)."""
    run_parts(lambda p: part(n * p // parts, n * (p + 1) // parts), parts)
