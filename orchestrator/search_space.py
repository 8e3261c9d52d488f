"""Sweep axes: `sweep:` maps dotted config keys to one of grid | choice | uniform | loguniform | randint.

    sweep:
      learner.num_keys: {grid: [64, 256, 1024]}     # every value, crossed with the other grid axes
      learner.key_init: {choice: [kmeans, ema]}     # sampled
      train.lr: {loguniform: [0.01, 1.0]}           # sampled between the bounds
      learner.num_codebooks: {randint: [8, 129]}    # integers in [low, high)

Each axis is checked against the run schema before anything starts: its key must exist and every value it
can take must be valid there.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from orchestrator.config import with_values
from workloads.config import ConfigError, parse_run_config

AXIS_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Axis:
    """One swept key: its kind and its values (grid, choice) or bounds (uniform, loguniform, randint)."""

    key: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def to_tune(self, sampled: bool = False):
        """The Ray Tune search-space object for this axis (`sampled`: a grid axis drawn like a choice)."""
        from ray import tune

        if self.kind == "grid" and not sampled:
            return tune.grid_search(list(self.values))
        if self.kind in ("grid", "choice"):
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def _check_value(base_raw: dict, key: str, value: Any, where: str) -> None:
    try:
        parse_run_config(with_values(base_raw, {key: value}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_sweep(sweep: dict, base_raw: dict) -> list[Axis]:
    """Validate `sweep:` against the base config; returns its axes in file order."""
    axes = []
    for key, spec in sweep.items():
        where = f"sweep.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one of {{{' | '.join(AXIS_KINDS)}: ...}}, got {spec!r}")
        (kind, arg), = spec.items()
        if kind not in AXIS_KINDS:
            raise ConfigError(f"{where}: unknown axis kind {kind!r}; accepted: {', '.join(AXIS_KINDS)}")
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {arg!r}")
            for value in arg:
                _check_value(base_raw, key, value, where)
            axes.append(Axis(key, kind, tuple(arg)))
            continue
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {arg!r}")
        low, high = arg
        if not low < high:
            raise ConfigError(f"{where}: {kind} bounds are inverted or empty: low {low} must be < high {high}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(v, int) for v in arg):
            raise ConfigError(f"{where}: randint needs integer bounds [low, high), got {arg!r}")
        _check_value(base_raw, key, low, where)
        axes.append(Axis(key, kind, (low, high)))
    return axes


# Keys whose value changes what the feature or key caches hold.
CACHE_KEY_PREFIXES = ("seed", "cache_dir", "data.", "backbone.", "learner.name", "learner.num_codebooks",
                      "learner.num_keys", "learner.key_", "learner.projection")


def changes_caches(key: str) -> bool:
    """Whether a swept key can change a cache key: a cache-relevant key itself, a block holding one
    (`learner`, `data`), or a preset."""
    return (key == "preset" or key.startswith(CACHE_KEY_PREFIXES)
            or any(prefix.startswith(key + ".") for prefix in CACHE_KEY_PREFIXES))


def cache_combinations(axes: list[Axis]) -> tuple[list[dict[str, Any]], list[Axis]]:
    """Every combination of the discrete axes that touch cache keys, and the sampled ones that do (unknowable)."""
    relevant = [a for a in axes if changes_caches(a.key)]
    discrete = [a for a in relevant if a.discrete]
    combos = [dict(zip([a.key for a in discrete], values))
              for values in itertools.product(*[a.values for a in discrete])]
    return combos, [a for a in relevant if not a.discrete]
