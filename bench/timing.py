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


def alternating_median_times(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each step, the steps taking turns (in a rotating order) within every repeat.

    Timing two implementations one after the other lets load from other processes, or a machine warming up,
    favour one of them; taking turns spreads that over both, so their ratio is fairer than two median_time runs.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
