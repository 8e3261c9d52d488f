"""Build, fit and restore a sweep: the Tuner over `run_trial`, its scheduler, search and MLflow tracking.

The experiment folder `<storage>/<name>` is Tune's: its state, trial results and checkpoints, which Tune's
syncer copies back and forth. clorch keeps its own files beside it, in `<storage>/.clorch/<name>`, where no
syncer overwrites them: the sweep's description (`sweep.json`), the MLflow run map, Ray Train's run folders.

Tune cannot add trials to an experiment it restores, so `clorch sweep FILE --name NAME --extend` runs the new
points as a Tune experiment of its own beside the first, `<storage>/NAME+1` (then `+2`, ...): a part of the
sweep, listed in sweep.json's `parts`, tracked under the same MLflow parent run, read by every command.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from orchestrator.config import ExperimentFile
from orchestrator.optuna_options import INSTALL, OptunaOptions
from workloads.config import ConfigError, from_dict, to_dict

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
DRIVER_ONLY = {"cpu": 0.01}  # a trial whose work runs in Train workers: its driver only waits (Ray needs > 0)


@dataclass
class Resources:
    """What one trial needs."""

    num_workers: int | None = None  # None: 0 (the trial's own process) without GPUs or with gpus_per_trial,
    #                                 else 1 GPU worker
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_trial: int = 1  # num_workers 0: CPUs the trial reserves
    cpus_per_worker: float = 1.0  # num_workers >= 1: CPUs each Ray Train worker reserves
    gpus_per_trial: float | None = None  # GPUs the trial (num_workers 0) or each Train worker holds; 0.25: four
    #                                      trials share a GPU. None: 1 per Train worker where use_gpu


@dataclass
class TuneOptions:
    """The `tune:` block of an experiment file."""

    metric: str | list[str] = "val/average_accuracy"  # selection on test data only when a test/ metric is named
    #                                                   here; several metrics: a Pareto selection
    mode: Literal["max", "min"] | list[Literal["max", "min"]] | None = None  # None: each metric's own direction
    num_samples: int = 1  # repeats of the grid (grid search) or samples drawn (random, optuna)
    scheduler: Literal["fifo", "asha"] = "fifo"
    search: Literal["grid", "random", "optuna"] = "grid"
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs fit
    max_failures: int = 0  # automatic retries of a failing trial (from its last stage checkpoint)
    fail_at_stage: int | None = None  # test-only: each trial raises once, before this stage, on its first attempt
    resources: Resources = field(default_factory=Resources)
    optuna: OptunaOptions = field(default_factory=OptunaOptions)  # sampler (search: optuna), seed and pruner


def parse_tune(raw: dict, experiment: ExperimentFile | None = None) -> TuneOptions:
    """Validate the `tune:` block (against the experiment's validation setting and seed when given); errors
    name `tune.<key>` and what is accepted."""
    from orchestrator.optuna_options import parse_optuna

    options = from_dict(TuneOptions, raw or {}, "tune")
    metrics = _parse_selection(options, experiment)
    if options.resources.num_workers is not None and options.resources.num_workers < 0:
        raise ConfigError(f"tune.resources.num_workers: must be >= 0, got {options.resources.num_workers}")
    for key, value, low in (("num_samples", options.num_samples, 1),
                            ("max_concurrent_trials", options.max_concurrent_trials, 1),
                            ("max_failures", options.max_failures, 0), ("fail_at_stage", options.fail_at_stage, 1),
                            ("resources.cpus_per_trial", options.resources.cpus_per_trial, 1)):
        if value is not None and value < low:
            raise ConfigError(f"tune.{key}: must be an integer >= {low}, got {value}")
    r = options.resources
    if r.gpus_per_trial is not None:
        if not (0 < r.gpus_per_trial <= 1 or (r.gpus_per_trial > 1 and float(r.gpus_per_trial).is_integer())):
            raise ConfigError(f"tune.resources.gpus_per_trial: got {r.gpus_per_trial}; accepted: a fraction in (0, 1] "
                              "(0.25: four trials per GPU) or a whole number of GPUs")
        if r.use_gpu is False:
            raise ConfigError("tune.resources.gpus_per_trial: set, but use_gpu is false; accepted: one of the two")
    if r.num_workers == 0 and r.use_gpu is True and r.gpus_per_trial is None:
        raise ConfigError("tune.resources.use_gpu: true with num_workers 0 needs gpus_per_trial (what the trial's "
                          "own process holds); accepted: gpus_per_trial (e.g. 0.25), or num_workers >= 1")
    if options.resources.cpus_per_worker <= 0:
        raise ConfigError(f"tune.resources.cpus_per_worker: must be > 0, got {options.resources.cpus_per_worker}")
    grids = [a.key for a in (experiment.axes if experiment else []) if a.kind == "grid"]
    if options.search == "optuna" and grids:
        raise ConfigError(f"tune.search: optuna samples every axis and cannot cross the grid axis sweep.{grids[0]}; "
                          "accepted: choice axes (choice: [...]) with optuna, or search: grid (grid axes crossed, "
                          "the others sampled num_samples times per grid point)")
    if options.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(f"tune.search: optuna needs the optuna package ({INSTALL})") from None
    options.optuna = parse_optuna(options.optuna, options.search, metrics, options.scheduler,
                                  experiment.base.seed if experiment else 0)
    return options


def _parse_selection(options: TuneOptions, experiment: ExperimentFile | None) -> list[str]:
    """Settle tune.metric (one metric, or several for a Pareto selection) and tune.mode (one per metric, by
    default each metric's own direction); returns the metrics."""
    from orchestrator.leaderboard import check_metric, selection_metrics

    metrics = selection_metrics(options.metric)
    if not metrics:
        raise ConfigError("tune.metric: got an empty list; accepted: a metric, or a list of metrics (a Pareto "
                          "selection)")
    repeated = [m for i, m in enumerate(metrics) if m in metrics[:i]]
    if repeated:
        raise ConfigError(f"tune.metric: {repeated[0]} is named twice; accepted: each metric once")
    directions = [check_metric(m, _always_validated(experiment)) for m in metrics]
    modes = [options.mode] if isinstance(options.mode, str) else options.mode
    if modes is not None and len(modes) != len(metrics):
        raise ConfigError(f"tune.mode: {len(modes)} mode(s) for {len(metrics)} metric(s) in tune.metric; accepted: "
                          "one mode (max or min) per metric, in order, or null (each metric's own direction)")
    modes = modes or directions
    if len(metrics) == 1:
        options.metric, options.mode = metrics[0], modes[0]
        return metrics
    options.metric, options.mode = metrics, modes
    if options.scheduler == "asha":
        raise ConfigError(f"tune.scheduler: asha stops trials on one metric, but tune.metric names {len(metrics)} "
                          f"({', '.join(metrics)}); accepted: fifo with several metrics, or one metric")
    return metrics


def preflight(experiment: ExperimentFile) -> set[int]:
    """The data and learner of every trial, checked on this machine before Ray starts (workloads.runner.
    preflight): the base config's, and those of each value of a grid or choice axis (a swept data set, stage
    split, key-init source or codebook size). Values drawn at random are not enumerated. Returns the numbers of
    stages the trials' streams have."""
    from orchestrator.config import with_values
    from workloads.config import parse_run_config
    from workloads.runner import preflight as preflight_run

    configs = [experiment.base] + [parse_run_config(with_values(experiment.base_raw, {axis.key: value}))
                                   for axis in experiment.axes if axis.discrete for value in axis.values]
    sources: dict[str, object] = {}  # each data set loaded (and checked) once
    checked: set[str] = set()
    stage_counts: set[int] = set()
    for config in configs:
        data_key = json.dumps(to_dict(config.data), sort_keys=True, default=str)
        what = data_key + json.dumps(to_dict(config.learner), sort_keys=True, default=str)
        if what not in checked:
            checked.add(what)
            sources[data_key], num_stages = preflight_run(config, sources.get(data_key))
            stage_counts.add(num_stages)
    return stage_counts


def _uses_cuda(experiment: ExperimentFile) -> bool:
    return experiment.base.device == "cuda" or any(
        value == "cuda" for axis in experiment.axes if axis.key == "device" and axis.discrete for value in axis.values)


def _always_validated(experiment: ExperimentFile | None) -> bool:
    """Whether every trial of the experiment has a validation set (data.validation > 0, swept or not)."""
    if experiment is None:
        return True
    values = [experiment.base.data.validation]
    for axis in (a for a in experiment.axes if a.kind in ("grid", "choice")):
        if axis.key == "data.validation":
            values += [v for v in axis.values if isinstance(v, (int, float))]
        elif axis.key == "data":
            values += [v.get("validation", 0.1) for v in axis.values if isinstance(v, dict)]
    return all(v > 0 for v in values)


def state_dir(storage: Path, name: str) -> Path:
    """clorch's own files for sweep `name` (kept out of Tune's experiment folder)."""
    return storage / ".clorch" / name


def param_space(experiment: ExperimentFile, options: TuneOptions) -> dict:
    """What each trial receives: the base config, the sweep axes as Tune search spaces, and run settings (no
    paths: a trial's config is frozen into Tune's state, and a sweep's storage may move)."""
    return {
        "base": experiment.base_raw,
        # search: random draws every axis, grid axes as choices; grid crosses grid axes and samples the rest
        "sweep": {axis.key: axis.to_tune(sampled=options.search == "random") for axis in experiment.axes},
        "fail_at_stage": options.fail_at_stage,
        "resources": {"num_workers": options.resources.num_workers, "use_gpu": options.resources.use_gpu,
                      "gpus_per_trial": options.resources.gpus_per_trial,
                      "cpus_per_worker": options.resources.cpus_per_worker},
    }


def resolve_resources(options: TuneOptions, gpus: float) -> Resources:
    """The trial's resources with `auto` and null settled for a cluster of `gpus` GPUs (sets them in place)."""
    r = options.resources
    if r.num_workers is None:  # a whole GPU goes to a Train worker; a share is held by the trial itself
        r.num_workers = 1 if (gpus or r.use_gpu is True) and r.gpus_per_trial is None else 0
    if r.use_gpu == "auto":
        r.use_gpu = bool(gpus) or r.gpus_per_trial is not None
    return r


def trials_that_fit(r: Resources, cpus: float, gpus: float) -> int:
    """How many trials with settled resources `r` run at once on `cpus` CPUs and `gpus` GPUs."""
    import math

    if r.num_workers == 0:
        cpu, gpu = float(r.cpus_per_trial), float(r.gpus_per_trial or 0)
    else:
        cpu = r.num_workers * r.cpus_per_worker + DRIVER_ONLY["cpu"]
        gpu = r.num_workers * (r.gpus_per_trial or 1) if r.use_gpu else 0.0
    return min([math.floor(cpus / cpu + 1e-9)] + ([math.floor(gpus / gpu + 1e-9)] if gpu else []))


def plan(experiment: ExperimentFile, options: TuneOptions, cpus: float, gpus: float) -> list[str]:
    """What `clorch sweep --dry-run` says: trials, what each reserves, how many run at once on a cluster of
    `cpus` CPUs and `gpus` GPUs, and the caches the sweep reads (`clorch cache FILE` fills them first)."""
    import math

    from orchestrator.leaderboard import with_directions

    grid = math.prod(len(a.values) for a in experiment.axes if a.kind == "grid")
    trials = options.num_samples * (grid if options.search == "grid" else 1)
    r = resolve_resources(options, gpus)
    if r.num_workers == 0:
        holds = (f"{r.cpus_per_trial} CPU" + (f" and {r.gpus_per_trial:g} GPU" if r.gpus_per_trial else "")
                 + " in its own process")
    else:
        holds = (f"{r.num_workers} Ray Train worker(s) of {r.cpus_per_worker:g} CPU"
                 + (f" and {r.gpus_per_trial or 1:g} GPU" if r.use_gpu else "") + " each, and a driver")
    fits = trials_that_fit(r, cpus, gpus)
    at_once = min(fits, trials, options.max_concurrent_trials or trials)
    configs, sampled = experiment.cache_configs()
    o = options.optuna
    search = options.search + (f" search: {o.sampler['name']} sampler, seed {o.seed}" if o.sampler else " search")
    pruner = f", {o.pruner['name']} pruner" if o.pruner else ""
    chosen = ("the Pareto set of " if isinstance(options.metric, list) else "") + \
        with_directions(options.metric, options.mode)
    lines = [f"{trials} trial(s) ({search}, num_samples {options.num_samples}), "
             f"{options.scheduler} scheduler{pruner}, selected on {chosen}",
             f"each trial reserves {holds}",
             f"this cluster ({cpus:g} CPU, {gpus:g} GPU) runs {at_once} at a time"
             + ("" if fits else ": none fits, the sweep would wait forever"),
             f"{len(configs)} distinct cache configuration(s) (`clorch cache {experiment.path}` fills them first)"]
    if sampled:
        lines.append(f"sampled axes that change caches, filled by their trials: {', '.join(sampled)}")
    return lines


def build_tuner(experiment: ExperimentFile, options: TuneOptions, name: str, storage: Path, tracking_uri: str,
                tracking=None, local: bool = True, num_stages: int | None = None, extension: Extension | None = None):
    """A Tuner for the experiment (fresh run), or for the new points of an `extension` of sweep `name`; a trial
    the cluster cannot place is refused before anything is written (on a remote cluster, `local` False, it is a
    warning: an autoscaler may add nodes)."""
    from ray import tune

    from orchestrator.cluster import check_resources, cluster_gpus, quiet_chosen_settings
    from orchestrator.console import StageLines
    from orchestrator.tracking import MLflowTracking, TrackingOptions

    quiet_chosen_settings()
    gpus = cluster_gpus()
    resolve_resources(options, gpus)
    if _uses_cuda(experiment) and not options.resources.use_gpu:
        raise ConfigError("device: cuda, but the sweep's trials get no GPU (the cluster has none, or "
                          "tune.resources.use_gpu is false); accepted: auto or cpu, or use_gpu on a cluster with GPUs")
    check_resources(to_dict(options.resources), local)
    if options.max_concurrent_trials is None and local:
        # no more trials started than run at once: a waiting Train-worker trial still holds a driver process.
        # (On a remote cluster an autoscaler may grow it, so Tune's own limit stays.)
        import ray

        have = ray.cluster_resources()
        options.max_concurrent_trials = max(1, trials_that_fit(options.resources, have.get("CPU", 0.0),
                                                               have.get("GPU", 0.0)))
    own_dir = state_dir(storage, name)
    own_dir.mkdir(parents=True, exist_ok=True)
    if extension is None:
        sweep_id = uuid.uuid4().hex  # names the sweep's MLflow runs (tag clorch.sweep_id) wherever it moves
        (own_dir / SWEEP_FILE).write_text(json.dumps({
            "file": str(experiment.path), "base": experiment.base_raw, "tune": to_dict(options),
            "sweep": {a.key: {a.kind: list(a.values)} for a in experiment.axes}, "tracking_uri": tracking_uri,
            "tracking": to_dict(tracking or TrackingOptions()), "id": sweep_id}, indent=1))
        space = param_space(experiment, options)
    else:  # exactly the new points, each a whole `sweep` value as a grid axis of one trial would give it
        sweep_id = extension.sweep_id
        space = {**param_space(experiment, options), "sweep": tune.grid_search(extension.points)}
    trainable = _trainable(to_dict(options.resources), own_dir)
    return tune.Tuner(
        trainable, param_space=space,
        # TuneConfig takes one metric: the first (Tune's "best trial"); the search holds the whole list
        tune_config=tune.TuneConfig(metric=_first(options.metric), mode=_first(options.mode),
                                    num_samples=options.num_samples,
                                    scheduler=_scheduler(options, num_stages), search_alg=_search(options),
                                    max_concurrent_trials=options.max_concurrent_trials),
        # verbose 0: Tune's trial tables and config dumps give way to clorch's line per stage (StageLines)
        run_config=tune.RunConfig(name=extension.part if extension else name, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=options.max_failures),
                                  # keeping one checkpoint makes Tune snapshot the experiment state at every
                                  # stage, so a restart resumes from the last stage reported, not an older one
                                  # (clorch keeps its own verified copies too: orchestrator.checkpoints)
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[MLflowTracking(tracking_uri, name, str(own_dir), tracking,
                                                            options.metric, options.mode, sweep_id),
                                             StageLines(_first(options.metric))]))


def check_scheduler(options: TuneOptions, stage_counts: set[int]) -> int | None:
    """ASHA and a pruner compare trials stage by stage, up to the last stage: every trial must have the same
    number of stages. Returns that number (ASHA's max_t) for asha or a pruner, None otherwise."""
    pruner = options.optuna.pruner
    if options.scheduler != "asha" and pruner is None:
        return None
    key, what, instead = (("tune.scheduler", "asha", "fifo") if options.scheduler == "asha" else
                          ("tune.optuna.pruner", f"the {pruner['name']} pruner", "pruner none"))
    if len(stage_counts) != 1:
        raise ConfigError(f"{key}: {what} compares trials stage by stage, but the swept values give streams of "
                          f"{' and '.join(map(str, sorted(stage_counts)))} stages; accepted: {instead}, or sweep "
                          "axes that keep the number of stages")
    return next(iter(stage_counts))


def _scheduler(options: TuneOptions, num_stages: int | None = None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if options.scheduler == "asha":  # `stage` counts from 0: the last stage reports num_stages - 1
        return ASHAScheduler(time_attr="stage", grace_period=1, reduction_factor=2,
                             max_t=max(num_stages - 1, 1) if num_stages else 100)
    if options.optuna.pruner is not None:  # one metric (parse_tune refuses a pruner with several)
        from orchestrator.pruning import StagePruner

        return StagePruner(options.optuna.pruner, options.metric, options.mode)
    return FIFOScheduler()


def _search(options: TuneOptions):
    """Optuna's search (one metric, or a multi-objective study over several) with the configured sampler; None
    for grid and random: Tune's basic variant generator (grid axes crossed, the others sampled)."""
    if options.search != "optuna":
        return None
    from orchestrator.optuna_options import make_sampler
    from orchestrator.pruning import StageAwareOptunaSearch

    return StageAwareOptunaSearch(metric=options.metric, mode=options.mode,
                                  sampler=make_sampler(options.optuna.sampler, options.optuna.seed))


def _first(value):
    return value[0] if isinstance(value, list) else value


def check_sweep(name: str, storage: Path) -> Path:
    """The experiment folder of sweep `name`; a ConfigError listing the sweeps there if it has none."""
    experiment_dir = storage / name
    if (state_dir(storage, name) / SWEEP_FILE).exists() and not (experiment_dir / "tuner.pkl").exists():
        raise ConfigError(f"{name}: the sweep never started (no Tune state in {experiment_dir}); remove "
                          f"{experiment_dir} and {state_dir(storage, name)} and run clorch sweep again")
    if not (state_dir(storage, name) / SWEEP_FILE).exists():
        known = storage / ".clorch"
        found = sorted(p.name for p in known.iterdir() if (p / SWEEP_FILE).exists()) if known.is_dir() else []
        raise ConfigError(f"{name}: no sweep of that name under {storage}; sweeps there: "
                          f"{', '.join(found) or 'none'}")
    return experiment_dir


def sweep_info(storage: Path, name: str) -> dict:
    """What `clorch sweep` recorded: the experiment file, base config, tune options, axes, tracking URI."""
    path = state_dir(storage, name) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: {path} cannot be read ({e}); it records how the sweep was started, and a resume "
                          "needs it: restore it from a backup, or run the sweep again under another --name") from None


_DRIVER_LOCKS: dict[str, object] = {}  # the lock files this process holds, open for its lifetime
DRIVER_LOCK = "driver.lock"


def hold_driver_lock(storage: Path, name: str) -> None:
    """Make this process the one driver of sweep `name` (an exclusive lock on a file in its state folder, held
    until the process ends), or refuse: two drivers would both run every trial and log everything twice."""
    import fcntl
    import os
    import socket

    own_dir = state_dir(storage, name)
    if str(own_dir) in _DRIVER_LOCKS:
        return  # this process is the driver already (a sweep, then its resume, in one program)
    own_dir.mkdir(parents=True, exist_ok=True)
    handle = open(own_dir / DRIVER_LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{name}: another clorch driver ({holder}) is running this sweep; wait for it to end or "
                          "stop it, then `clorch resume` it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _DRIVER_LOCKS[str(own_dir)] = handle


def record_tracking_uri(storage: Path, name: str, tracking_uri: str) -> None:
    """Remember the store a resumed sweep logs to now (the next resume, status and report default to it)."""
    info = sweep_info(storage, name)
    if info.get("tracking_uri") != tracking_uri:
        path = state_dir(storage, name) / SWEEP_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**info, "tracking_uri": tracking_uri}, indent=1))
        tmp.replace(path)


def restore_tuner(name: str, storage: Path, tracking_uri: str | None = None, part: str | None = None,
                  restart_errored: bool = False):
    """The Tuner of an existing experiment (`part`: one of the sweep's Tune experiments, default its first):
    errored trials continue from their last stage checkpoint, or with `restart_errored` start again from stage 1
    (Tune gives each a new trial id; MLflow a new child run, the old one marked superseded). Its trials and its
    MLflow tracking are bound to the sweep's folder as it is now under `storage`, and to `tracking_uri`
    (default: the store the sweep was started with), wherever the sweep was before."""
    from ray import tune

    from orchestrator.tracking import MLflowTracking, plan_restarts
    from orchestrator.trial import mark_restart

    experiment_dir = part_dir(storage, name, part or name)
    own_dir = state_dir(storage, name)
    info = sweep_info(storage, name)
    MLflowTracking.bind(name, tracking_uri or info["tracking_uri"], str(own_dir))
    _stand_in_for_lost_checkpoints(experiment_dir)
    if restart_errored:
        errored = [t for t in read_analysis(experiment_dir).trials if t.status == "ERROR"]
        plan_restarts(own_dir, errored)
        for trial in errored:
            mark_restart(own_dir, trial.config, trial.trial_id)
    trainable = _trainable(info["tune"]["resources"], own_dir)
    with _readable_tune_state(experiment_dir):
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=not restart_errored,
                                  restart_errored=restart_errored)


def sweep_parts(storage: Path, name: str) -> list[Path]:
    """The experiment folders of sweep `name`, in order: the one `clorch sweep` started, then one per
    `--extend`; a ConfigError if the sweep or one of its parts has no Tune state."""
    check_sweep(name, storage)
    return [part_dir(storage, name, part["name"]) for part in sweep_info(storage, name).get("parts", [])] or \
        [storage / name]


def part_dir(storage: Path, name: str, part: str) -> Path:
    """The experiment folder of one part of sweep `name`; a ConfigError if Tune's state is not there."""
    if part == name:
        return check_sweep(name, storage)
    folder = storage / part
    if not (folder / "tuner.pkl").exists():
        raise ConfigError(f"{name}: its part {part} (a --extend) has no Tune state in {folder}; nothing was changed: "
                          f"restore that folder, or remove the part from {state_dir(storage, name) / SWEEP_FILE}")
    return folder


def part_results(experiment_dir: Path) -> list:
    """The Result of each trial of one part of a sweep, read from its folder (as a Tuner's get_results gives)."""
    from ray.tune import ResultGrid

    return list(ResultGrid(read_analysis(experiment_dir)))


def open_trials(experiment_dir: Path) -> tuple[int, int]:
    """(errored, unfinished) trials of one part of a sweep, as its state on disk says."""
    statuses = [t.status for t in read_analysis(experiment_dir).trials]
    return statuses.count("ERROR"), sum(s not in ("ERROR", "TERMINATED") for s in statuses)


def extended_trials(own_dir: Path) -> list:
    """Tune's trials of every part of a sweep that `--extend` grew, read from their folders (none for a sweep of
    one part, whose driver has every trial); `own_dir` is the sweep's state folder, <storage>/.clorch/NAME."""
    parts = json.loads((own_dir / SWEEP_FILE).read_text()).get("parts") or []
    if len(parts) < 2:
        return []
    storage = own_dir.parent.parent
    return [t for part in parts for t in read_analysis(storage / part["name"]).trials]


@dataclass
class Extension:
    """What `clorch sweep FILE --name NAME --extend` adds to sweep NAME: a Tune experiment of its own (`part`, a
    folder beside the sweep's first) over exactly the file's new points, tracked under the sweep's parent run."""

    part: str
    points: list[dict]  # swept key -> value, one dict per new point (each run num_samples times)
    ran: int  # distinct points the sweep ran already
    sweep_id: str | None


# tune options that `clorch sweep` settles for the cluster when the file leaves them null or auto
RESOLVED_AT_START = ("max_concurrent_trials", "resources.num_workers", "resources.use_gpu")


def plan_extension(experiment: ExperimentFile, options: TuneOptions, tracking, name: str,
                   storage: Path) -> Extension:
    """The new points of `experiment` for existing sweep `name`, or one ConfigError naming what differs from the
    sweep; reads the sweep's files only (nothing written, no Ray): base config, tune and tracking options the
    same, the same grid axes (values may be added), some point not run yet, and every trial of the sweep
    finished."""
    from orchestrator.tracking import TrackingOptions
    from workloads.config import flatten, parse_run_config

    try:
        check_sweep(name, storage)
    except ConfigError as e:
        raise ConfigError(f"--extend: {e}") from None
    info = sweep_info(storage, name)
    where = (experiment.path, name)
    # the sweep's record read through today's schema, so that a default added since compares equal
    _same("base", flatten(to_dict(parse_run_config(info["base"]))), flatten(to_dict(experiment.base)), *where,
          "the sweep's base config (--extend adds values to its grid axes only)")
    ours = flatten(to_dict(options))
    _same("tune", {k: v for k, v in flatten(to_dict(from_dict(TuneOptions, info["tune"], "tune"))).items()
                   if not (k in RESOLVED_AT_START and ours.get(k) in (None, "auto"))},
          {k: v for k, v in ours.items() if not (k in RESOLVED_AT_START and v in (None, "auto"))}, *where,
          "the sweep's tune options")
    if "tracking" in info:  # (a sweep started before sweep.json recorded them: not compared)
        _same("tracking", flatten(to_dict(from_dict(TrackingOptions, info["tracking"], "tracking"))),
              flatten(to_dict(tracking)), *where, "the sweep's tracking options")
    recorded = {key: next(iter(spec)) for key, spec in info["sweep"].items()}  # key -> axis kind
    axes = {a.key: a for a in experiment.axes}
    for key, kind in recorded.items():
        if key not in axes:
            raise ConfigError(f"--extend: sweep.{key} is an axis of sweep {name} but not of {experiment.path}; "
                              f"accepted: every axis of the sweep ({', '.join(recorded)}), with more values")
        if axes[key].kind != kind:
            raise ConfigError(f"--extend: sweep.{key} is a {axes[key].kind} axis here but a {kind} axis in sweep "
                              f"{name}; accepted: {kind}, with more values")
    for key in axes:
        if key not in recorded:
            raise ConfigError(f"--extend: sweep.{key} is not an axis of sweep {name}; accepted: its own axes "
                              f"({', '.join(recorded) or 'none'}), with more values")
    for axis in experiment.axes:
        if axis.kind != "grid":
            raise ConfigError(f"--extend: sweep.{axis.key} is a {axis.kind} axis, whose points are drawn, not "
                              "listed, so the new ones cannot be told apart; accepted: grid axes only")
    if options.search != "grid":
        raise ConfigError(f"--extend: tune.search {options.search} draws every point, so the new ones cannot be "
                          "told apart; accepted: search: grid, with grid axes only")
    ran = {_point_key(point) for part in _parts(info, name) for point in part["points"]}
    points = {_point_key(p): p for p in _grid_points({a.key: {"grid": list(a.values)} for a in experiment.axes})}
    new = [point for key, point in points.items() if key not in ran]
    if not new:
        raise ConfigError(f"--extend: nothing to add: all {len(points)} points of {experiment.path} already ran in "
                          f"sweep {name}; accepted: more values on its grid axes")
    errored = unfinished = 0
    for folder in sweep_parts(storage, name):
        e, u = open_trials(folder)
        errored, unfinished = errored + e, unfinished + u
    if errored or unfinished:
        raise ConfigError(f"--extend: sweep {name} has {errored} errored and {unfinished} unfinished trial(s); "
                          f"`clorch resume {name}` first: only a sweep whose every trial finished is extended")
    parts = {part["name"] for part in _parts(info, name)}
    index = len(parts)
    while f"{name}+{index}" in parts or (storage / f"{name}+{index}").exists():  # a folder an attempt left
        index += 1
    return Extension(f"{name}+{index}", new, len(ran), info.get("id"))


def record_part(storage: Path, name: str, extension: Extension, path: Path) -> None:
    """List the extension's Tune experiment (and its points) among the parts of sweep `name` in sweep.json, so
    that status, report, resume and the next --extend see it."""
    info = sweep_info(storage, name)
    parts = _parts(info, name) + [{"name": extension.part, "file": str(path), "points": extension.points}]
    target = state_dir(storage, name) / SWEEP_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "parts": parts}, indent=1))
    tmp.replace(target)


def _parts(info: dict, name: str) -> list[dict]:
    """sweep.json's parts; a sweep never extended has one, whose points are its grid axes crossed."""
    return info.get("parts") or [{"name": name, "points": _grid_points(info["sweep"])}]


def _grid_points(axes: dict[str, dict]) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k]["grid"] for k in keys))]


def _point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def _same(block: str, theirs: dict, ours: dict, path: Path, name: str, accepted: str) -> None:
    """A ConfigError naming the first key of `block` whose value differs between sweep `name` and file `path`."""
    for key in [*theirs, *(k for k in ours if k not in theirs)]:
        if theirs.get(key) != ours.get(key):
            raise ConfigError(f"--extend: {block}.{key} is {ours.get(key)!r} in {path} but {theirs.get(key)!r} in "
                              f"sweep {name}; accepted: {accepted}")


def read_analysis(experiment_dir: Path):
    """Tune's ExperimentAnalysis of a sweep folder (its trials, their results), or one ConfigError if Tune's
    state there cannot be read."""
    from ray.tune import ExperimentAnalysis

    with _readable_tune_state(experiment_dir):
        return ExperimentAnalysis(str(experiment_dir))


@contextlib.contextmanager
def _readable_tune_state(experiment_dir: Path):
    """Tune's own files (tuner.pkl, experiment_state-*.json) truncated or altered: one line that says what
    survives, instead of Tune's traceback. Nothing is changed on disk."""
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{experiment_dir.name}: Tune's state in {experiment_dir} cannot be read "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); nothing "
                          "was changed: each trial's results stay in its folder (result.json) and in MLflow. "
                          "Run the sweep again under another --name") from None


def _stand_in_for_lost_checkpoints(experiment_dir: Path) -> None:
    """Tune refuses to restore a trial whose last checkpoint folder is gone. An empty folder stands in for it:
    the trial then finds no state there and continues from clorch's own verified copies, or from scratch
    (orchestrator.checkpoints), and says which."""
    for trial in read_analysis(experiment_dir).trials:
        if trial.checkpoint is not None and not Path(trial.checkpoint.path).exists():
            log.warning("trial %s: its last checkpoint %s is gone; it continues from the newest verified copy",
                        trial.trial_id, trial.checkpoint.path)
            Path(trial.checkpoint.path).mkdir(parents=True)


def _trainable(resources: dict, own_dir: Path):
    """run_trial bound to the sweep's folder as it is now, with what its driver reserves: the trial's CPUs, or a
    token when Train workers do the work."""
    from ray import tune

    from orchestrator.trial import run_trial

    if resources["num_workers"] == 0:  # the trial's own process does the work and holds its GPU share
        holds = {"cpu": resources["cpus_per_trial"], "gpu": resources.get("gpus_per_trial") or 0}
    else:
        holds = DRIVER_ONLY
    return tune.with_resources(tune.with_parameters(run_trial, state_dir=str(own_dir)), holds)


def trial_summaries(results) -> list:
    """The leaderboard's view (orchestrator.leaderboard.TrialSummary) of a Tune ResultGrid's trials."""
    return [_summary(m.get("trial_id") or Path(r.path).name, "error" if r.error else None, m, r.config)
            for r in results for m in [r.metrics or {}]]


def live_trial_summaries(trials) -> list:
    """The leaderboard's view of Tune's Trial objects (in a Tune callback, or as ExperimentAnalysis reads
    them); a trial Tune ended before its last stage (ASHA) is `stopped`."""
    return [_summary(t.trial_id, None if t.status == "TERMINATED" else t.status.lower(), t.last_result or {},
                     t.config, unfinished="stopped") for t in trials]


def _summary(trial_id: str, state: str | None, last: dict, config: dict | None, unfinished: str = "incomplete"):
    """A TrialSummary; `state` None means: done if every stage reported, `stopped` if a scheduler (ASHA, a
    pruner) ended it before its last stage, else `unfinished`."""
    from orchestrator.leaderboard import TrialSummary

    total = last.get("num_stages")
    stages = int(last["stage"]) + 1 if last.get("stage") is not None else 0
    # Tune marks the last result of a trial its scheduler stopped `done`; one stopped by Ctrl-C is not
    state = state or ("done" if total and stages == total else "stopped" if last.get("done") else unfinished)
    return TrialSummary(trial_id, state, stages, total,
                        {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                        {k: short_value(v) for k, v in ((config or {}).get("sweep") or {}).items()},
                        label=trial_label(config), config_label=trial_label(config, seeds=False))


def short_value(value):
    """A swept block as one readable cell: {name: dkvb, num_keys: 256} -> dkvb(num_keys=256)."""
    if not isinstance(value, dict):
        return value
    rest = ", ".join(f"{k}={short_value(v)}" for k, v in value.items() if k != "name")
    return f"{value['name']}({rest})" if "name" in value else "{" + rest + "}"


# Short names of swept keys in trial names; a key not here goes in by its last dotted part.
NAME_ALIASES = {"num_codebooks": "C", "num_keys": "K", "key_dim": "dk", "value_dim": "dv", "memory_size": "mem",
                "class_order_seed": "order_seed"}
# The options of a swept learner block that name it (its size); the rest stay in the run's params only.
BLOCK_NAME_KEYS = ("num_codebooks", "num_keys", "key_dim", "topk", "hidden")


def trial_label(config: dict, seeds: bool = True) -> str:
    """A trial's name from what it sweeps: `dkvb K=256 seed=1`, `dytox mem=200 seed=0`: the learner first (its
    block's size options with it), seeds last (left out with seeds=False: the configuration's name)."""
    point = dict((config or {}).get("sweep") or {})
    base_learner = ((config or {}).get("base") or {}).get("learner") or {}
    learner = point.pop("learner", None)
    name = (learner or {}).get("name") if isinstance(learner, dict) else None
    name = point.pop("learner.name", None) or name or base_learner.get("name", "run")
    words = [str(name)]
    if isinstance(learner, dict):
        words += [f"{NAME_ALIASES.get(k, k)}={_word(v)}" for k, v in learner.items() if k in BLOCK_NAME_KEYS]
    with_seeds, seeds = seeds, [k for k in point if k.rpartition(".")[2] in ("seed", "class_order_seed")]
    for key in [*(k for k in point if k not in seeds), *(seeds if with_seeds else [])]:
        value = point[key]
        short = key.rpartition(".")[2]
        if isinstance(value, dict):  # another swept block (a backbone, a rehearsal block): its name or its values
            words.append(str(value["name"]) if "name" in value else f"{short}={short_value(value)}")
        else:
            words.append(f"{NAME_ALIASES.get(short, short)}={_word(value)}")
    return " ".join(words)[:250]


def _word(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(short_value(value))

