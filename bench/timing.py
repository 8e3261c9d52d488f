"""The one timing helper the bench scripts share."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(step: Callable[[], object], warmup: int, repeats: int,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of step() over `repeats` runs, after `warmup` untimed ones (wall time unless `clock` says
    otherwise, e.g. time.process_time: CPU time, steadier on a shared machine)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)
