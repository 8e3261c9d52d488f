"""The `tune.optuna:` block: the Optuna sampler that draws the trials of `search: optuna`, its seed, and the
Optuna pruner that stops unpromising trials after a stage (with any search), each checked before Ray starts.

    tune:
      search: optuna
      optuna:
        sampler: tpe                                   # or {name: tpe, n_startup_trials: 4}
        seed: 7                                        # null: the base config's seed
        pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}

A sampler or pruner is a name, or a mapping with `name` and that sampler's or pruner's own options (the ones
in SAMPLERS and PRUNERS, passed to Optuna's class of that name). Pruning steps are stages, counted from 0.
"""
from __future__ import annotations

import contextlib
import copyreg
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from workloads.config import ConfigError

INSTALL = 'pip install optuna, or clorch\'s extra: pip install -e ".[optuna]"'
SEED_RANGE = 2**32  # numpy's RandomState, which Optuna's samplers seed, takes seeds below 2**32


@dataclass
class OptunaOptions:
    """The `tune.optuna:` block; after `parse_optuna`, sampler and pruner are {name, options...} or None."""

    sampler: Any = None  # a name or {name: ..., <option>: ...}; null: tpe. Only with search: optuna
    seed: int | None = None  # the sampler's seed; null: the base config's seed (mod 2**32)
    pruner: Any = None  # a name or {name: ..., <option>: ...}; null or none: no pruner


@dataclass(frozen=True)
class Option:
    """What one option of a sampler or pruner accepts."""

    accepted: str
    check: Callable[[Any], bool]


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(low: int) -> Option:
    return Option(f"an integer >= {low}", lambda v: _integer(v) and v >= low)


def _auto_or_at_least(low: int) -> Option:
    return Option(f"auto or an integer >= {low}", lambda v: v == "auto" or (_integer(v) and v >= low))


BOOLEAN = Option("true or false", lambda v: isinstance(v, bool))
PERCENTILE = Option("a number in [0, 100]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0 <= v <= 100)


@dataclass(frozen=True)
class Kind:
    """A sampler or pruner clorch offers: Optuna's class, its options, and how many metrics it takes."""

    cls: str
    options: dict[str, Option]
    objectives: str = "any"  # any | one | several
    required: tuple[str, ...] = ()
    package: str | None = None  # a package Optuna imports only when the class is used


SAMPLERS = {
    "tpe": Kind("TPESampler", {"n_startup_trials": _at_least(0), "multivariate": BOOLEAN}),
    "random": Kind("RandomSampler", {}),
    "cmaes": Kind("CmaEsSampler", {"n_startup_trials": _at_least(0)}, objectives="one", package="cmaes"),
    "gp": Kind("GPSampler", {"n_startup_trials": _at_least(0)}),
    "qmc": Kind("QMCSampler", {"qmc_type": Option("sobol or halton", lambda v: v in ("sobol", "halton")),
                               "scramble": BOOLEAN}),
    "nsga2": Kind("NSGAIISampler", {"population_size": _at_least(2)}, objectives="several"),
}

_PERCENTILE_OPTIONS = {"n_startup_trials": _at_least(0), "n_warmup_steps": _at_least(0),
                       "interval_steps": _at_least(1), "n_min_trials": _at_least(1)}
PRUNERS = {
    "none": Kind("NopPruner", {}),
    "median": Kind("MedianPruner", _PERCENTILE_OPTIONS, objectives="one"),
    "percentile": Kind("PercentilePruner", {"percentile": PERCENTILE, **_PERCENTILE_OPTIONS}, objectives="one",
                       required=("percentile",)),
    "successive_halving": Kind("SuccessiveHalvingPruner", {
        "min_resource": _auto_or_at_least(1), "reduction_factor": _at_least(2),
        "min_early_stopping_rate": _at_least(0), "bootstrap_count": _at_least(0)}, objectives="one"),
    "hyperband": Kind("HyperbandPruner", {
        "min_resource": _at_least(1), "max_resource": _auto_or_at_least(1), "reduction_factor": _at_least(2),
        "bootstrap_count": _at_least(0)}, objectives="one"),
}


def parse_optuna(options: OptunaOptions, search: str, metrics: list[str], scheduler: str,
                 default_seed: int) -> OptunaOptions:
    """Check the `tune.optuna:` block against the sweep's search, selection metrics and scheduler; returns it
    with sampler and pruner as {name, options...} (or None) and the seed settled. Errors name the key."""
    if search != "optuna":
        for key in ("sampler", "seed"):
            if getattr(options, key) is not None:
                raise ConfigError(f"tune.optuna.{key}: only search: optuna draws trials with Optuna's sampler, "
                                  f"and tune.search is {search}; accepted: search: optuna, or no {key} (grid and "
                                  "random search draw with Tune's own generator)")
        sampler, seed = None, None
    else:
        sampler = _parse_kind("sampler", options.sampler or "tpe", SAMPLERS)
        _check_objectives("sampler", sampler["name"], SAMPLERS, len(metrics))
        seed = default_seed % SEED_RANGE if options.seed is None else options.seed
        if not 0 <= seed < SEED_RANGE:
            raise ConfigError(f"tune.optuna.seed: got {seed}; accepted: an integer in [0, 2**32), or null (the base "
                              "config's seed)")
    pruner = _parse_kind("pruner", options.pruner or "none", PRUNERS)
    if pruner["name"] == "none":
        pruner = None
    else:
        _check_objectives("pruner", pruner["name"], PRUNERS, len(metrics))
        if scheduler == "asha":
            raise ConfigError(f"tune.optuna.pruner: {pruner['name']} and tune.scheduler: asha would both stop trials "
                              "early; accepted: one of them (scheduler fifo with a pruner, or pruner none with asha)")
    if sampler is not None or pruner is not None:
        try:
            import optuna  # noqa: F401
        except ImportError:
            key = "sampler" if sampler is not None else "pruner"
            raise ConfigError(f"tune.optuna.{key}: needs the optuna package ({INSTALL})") from None
    if sampler is not None:
        make_sampler(sampler, seed)  # Optuna's own checks of option combinations, before Ray starts
    if pruner is not None:
        make_pruner(pruner)
    return OptunaOptions(sampler, seed, pruner)


def _parse_kind(key: str, raw: Any, kinds: dict[str, Kind]) -> dict:
    """A sampler or pruner as {name, options...}, each option checked against what that kind accepts."""
    names = ", ".join(kinds)
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ConfigError(f"tune.optuna.{key}: expected a name or {{name: ..., <option>: ...}}, got {raw!r}; "
                          f"accepted names: {names}")
    name = raw["name"]
    if name not in kinds:
        raise ConfigError(f"tune.optuna.{key}: unknown {key} {name!r}; accepted: {names}")
    kind = kinds[name]
    accepted = f"accepted for {name}: {', '.join(kind.options) or 'no options'}"
    for option, value in raw.items():
        if option == "name":
            continue
        if option not in kind.options:
            owners = [n for n, k in kinds.items() if option in k.options]
            whose = f" (an option of {' and '.join(owners)})" if owners else ""
            raise ConfigError(f"tune.optuna.{key}.{option}: not an option of the {name} {key}{whose}; {accepted}")
        if not kind.options[option].check(value):
            raise ConfigError(f"tune.optuna.{key}.{option}: got {value!r}; accepted: {kind.options[option].accepted}")
    for option in kind.required:
        if option not in raw:
            raise ConfigError(f"tune.optuna.{key}.{option}: the {name} {key} needs it; accepted: "
                              f"{kind.options[option].accepted}")
    if kind.package:
        try:
            importlib.import_module(kind.package)
        except ImportError:
            raise ConfigError(f"tune.optuna.{key}: {name} needs the {kind.package} package (pip install "
                              f"{kind.package}, or clorch's extra: pip install -e \".[optuna]\")") from None
    return dict(raw)


def _check_objectives(key: str, name: str, kinds: dict[str, Kind], n_metrics: int) -> None:
    objectives = kinds[name].objectives
    if objectives == "several" and n_metrics == 1:
        fits = [n for n, k in kinds.items() if k.objectives != "several"]
        raise ConfigError(f"tune.optuna.{key}: {name} trades off several metrics, but tune.metric names one; "
                          f"accepted for one metric: {', '.join(fits)}, or a list of metrics in tune.metric")
    if objectives == "one" and n_metrics > 1:
        fits = [n for n, k in kinds.items() if k.objectives != "one"]
        raise ConfigError(f"tune.optuna.{key}: {name} works on one metric, but tune.metric names {n_metrics}; "
                          f"accepted with several metrics: {', '.join(fits)}")


def make_sampler(spec: dict, seed: int):
    """Optuna's sampler for a parsed `tune.optuna.sampler`, seeded."""
    import optuna

    options = {k: v for k, v in spec.items() if k != "name"}
    with _optuna_refusal("sampler"):
        return picklable(getattr(optuna.samplers, SAMPLERS[spec["name"]].cls)(seed=seed, **options))


# --- samplers that hold a lock ---------------------------------------------------------------------------------
# Tune pickles the search with its sampler: into the Tuner's state when a sweep starts, and into every searcher
# checkpoint. Optuna 5.1's genetic samplers (NSGA-II) keep a threading.Lock as an attribute, which pickle
# refuses. Their class is registered with copyreg (which pickle and Ray's cloudpickle both consult) to pickle
# without its locks and get fresh ones when unpickled: a lock guards a running process, it has no state to keep.
_LOCKS = {"lock": threading.Lock, "rlock": threading.RLock}
_LOCK_TYPES = {type(make()): kind for kind, make in _LOCKS.items()}


def picklable(sampler):
    """`sampler`, its class registered to pickle without the locks its attributes hold (where it holds any)."""
    if any(type(v) in _LOCK_TYPES for v in vars(sampler).values()):
        copyreg.pickle(type(sampler), _reduce_without_locks)
    return sampler


def _reduce_without_locks(obj):
    state = obj.__getstate__()  # the class's own state: its __dict__, unless the class says otherwise
    locks = {k: _LOCK_TYPES[type(v)] for k, v in state.items() if type(v) in _LOCK_TYPES}
    return _with_fresh_locks, (type(obj), {k: v for k, v in state.items() if k not in locks}, locks)


def _with_fresh_locks(cls, state: dict, locks: dict[str, str]):
    copyreg.pickle(cls, _reduce_without_locks)  # a resumed driver pickles it again, at its next checkpoint
    obj = cls.__new__(cls)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    for name, kind in locks.items():
        setattr(obj, name, _LOCKS[kind]())
    return obj


def make_pruner(spec: dict):
    """Optuna's pruner for a parsed `tune.optuna.pruner`."""
    import optuna

    options = {k: v for k, v in spec.items() if k != "name"}
    with _optuna_refusal("pruner"):
        return getattr(optuna.pruners, PRUNERS[spec["name"]].cls)(**options)


@contextlib.contextmanager
def _optuna_refusal(key: str):
    """A combination of options Optuna itself refuses, as one line naming the key."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"tune.optuna.{key}: Optuna refuses these options ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's info lines (a study created, each trial told) held back: Tune's progress table and clorch's own
    line per pruned trial already say it, and the console keeps one line per event."""
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
