"""The one timing helper the bench scripts share."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(step: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of step() over `repeats` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
