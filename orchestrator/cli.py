"""The `clorch` command line. User mistakes end in one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from workloads.config import ConfigError
from workloads.data.sources import DataError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes in clorch's one-line form (argparse prints the whole usage first)."""

    def error(self, message: str):
        print(f"clorch: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clorch", description="Continual-learning experiments around the "
                     "Discrete Key-Value Bottleneck.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment file's base config once, in this process (no Ray)")
    run.add_argument("file", help="experiment YAML file (its base: block is run)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set learner.num_keys=512 (repeatable)")
    run.add_argument("--output", metavar="JSON", help="write the accuracy matrix, metrics and resolved config here")
    run.add_argument("-q", "--quiet", action="store_true", help="only the per-stage table and the summary")
    cache = sub.add_parser("cache", help="precompute the embeddings and DKVB keys an experiment file needs")
    cache.add_argument("file", help="experiment YAML file")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    cache.add_argument("--address", help="Ray cluster address: encode as Ray tasks spread over its nodes (default: "
                       "$RAY_ADDRESS, else in this process, without Ray)")
    for name, helptext in (("sweep", "run the file's sweep on Ray Tune, tracked in MLflow (or, with --extend, "
                                     "its new points in an existing sweep)"),
                           ("resume", "resume a sweep: errored and unfinished trials continue (or, with "
                                      "--restart-errored, errored ones start again), finished ones stay"),
                           ("status", "each trial's state, stage reached and metric")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("file" if name == "sweep" else "name", help="experiment YAML file" if name == "sweep"
                       else "sweep name (its folder under --storage)")
        if name == "sweep":
            p.add_argument("--name", help="sweep name (default: the file's base name)")
            p.add_argument("--dry-run", action="store_true", help="print the trials, what each reserves, how many "
                           "run at once here and the caches to build, then exit (nothing is written)")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a base config key (repeatable)")
            p.add_argument("--extend", action="store_true", help="add the file's new points (more values on its "
                           "grid axes) to the existing sweep --name, under the same MLflow parent run (in the "
                           "sweep's store, unless --tracking-uri); points already run are not run again")
        if name == "resume":
            p.add_argument("--restart-errored", action="store_true", help="errored trials start again from stage "
                           "1 (no checkpoint), each in a new MLflow child run; the old run stays FAILED, tagged "
                           "clorch.superseded_by")
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
        p.add_argument("--storage", help="experiment storage folder (default: ./clorch_runs)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
        p.add_argument("--num-cpus", type=_positive_int, help="CPUs of a local Ray (default: all)")
    report = sub.add_parser("report", help="a sweep's leaderboard (markdown, CSV), comparison figures, per-trial "
                            "plots and one HTML page of it all")
    report.add_argument("name", help="sweep name")
    report.add_argument("--storage", help="experiment storage folder (default: ./clorch_runs)")
    report.add_argument("--out", help="folder for the CSVs, figures and the HTML page (default: "
                        "./clorch_report/NAME)")
    report.add_argument("--metric", help="rank by this metric (default: the sweep's selection metric)")
    report.add_argument("--mode", choices=("max", "min"), help="better is max or min (default: the metric's own "
                        "direction, e.g. min for forgetting)")
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the tracking store")
    ui.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    ui.add_argument("--port", type=_port, default=5000, help="port on 127.0.0.1 (default: 5000)")
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 CPUs would leave every trial waiting forever)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}")
    return int(text)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def cmd_run(args) -> int:
    from orchestrator.config import load_experiment
    from workloads.runner import protocol_lines, resolve_device, run_stream
    from workloads.threads import use_threads

    experiment = load_experiment(args.file, args.overrides)
    config = experiment.base
    resolve_device(config.device)  # `cuda` without a GPU fails here, before any output or work
    threads = use_threads()  # one per CPU of this process, unless CLORCH_THREADS says; a bad value fails here
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.exists():
        raise ConfigError(f"--output: folder {output.parent} does not exist")
    print(f"clorch run {args.file}: learner {config.learner.name}, data {config.data.source}, seed {config.seed}")
    print(threads)
    memory = config.rehearsal.memory_size > 0
    val = config.data.validation > 0
    axis = "stage" if config.data.stream == "class_incremental" else "domain"  # a domain stream's stages
    print(f"{axis:>6}  {'classes':<16} " + (f"{'val acc':>8} " if val else "") +
          f"{'test acc':>8} {'loss':>8} {'time':>8}" + ("  memory" if memory else ""))

    def on_stage_end(stage: int, m: dict, state: dict) -> None:
        classes = ",".join(str(c) for c in m["classes"]) if axis == "stage" else f"all {len(m['classes'])}"
        print(f"{stage + 1:>6}  {classes:<16} " + (f"{_fmt(m['val/accuracy_on_seen_classes']):>8} " if val else "")
              + f"{_fmt(m['test/accuracy_on_seen_classes']):>8} {m['loss']:>8.4f} {m['seconds']:>7.1f}s"
              + (f"  {m['memory_size']:>6}" if memory else ""), flush=True)

    t0 = time.perf_counter()
    result = run_stream(config, on_stage_end=on_stage_end)
    for split, scores in result.splits.items():
        m = scores.metrics(result.stages)
        print(f"{split:>4}: average accuracy {_fmt(m['average_accuracy'])}  average incremental accuracy "
              f"{_fmt(m['average_incremental_accuracy'])}  forgetting {_fmt(m['forgetting'])}  bwt {_fmt(m['bwt'])}")
    for line in protocol_lines(result.protocol):
        print(f"protocol: {line}")
    print(f"({time.perf_counter() - t0:.1f}s)")
    if output is not None:
        output.write_text(json.dumps(result.to_json(), indent=2))
        print(f"results written to {output}")
    return 0


def cmd_cache(args) -> int:
    import os

    from orchestrator.config import load_experiment
    from workloads.runner import precompute

    experiment = load_experiment(args.file, args.overrides)
    configs, sampled = experiment.cache_configs()
    address = args.address or os.environ.get("RAY_ADDRESS")
    print(f"clorch cache {args.file}: {len(configs)} config(s) with distinct caches"
          + (f"; encoding on the Ray cluster at {address}" if address else ""))
    if sampled:
        print(f"note: sampled axes {', '.join(sampled)} change the caches; their trials fill them as they run")
    if address:
        from orchestrator.cluster import join
        from orchestrator.encode import encode_configs

        join(address)
        reports = encode_configs(configs, _say)
        if any(not Path(r["path"]).exists() for r in reports):
            print("DKVB keys: left to the trials (this machine does not see the cluster's cache)")
            return 0
        # keys (and what is left: nothing, where the tasks wrote a cache this machine shares) in this process
        configs = [c for c in configs if c.learner.name == "dkvb"]
    for i, config in enumerate(configs, 1):
        report = precompute(config)
        print(f"[{i}/{len(configs)}] {report}", flush=True)
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def _target(args):
    from orchestrator.cluster import resolve_target

    return resolve_target(getattr(args, "address", None), getattr(args, "storage", None), args.tracking_uri)


def cmd_sweep(args) -> int:
    from orchestrator.cluster import check_tracking, connect
    from orchestrator.config import load_experiment
    from orchestrator.sweep import build_tuner, check_scheduler, hold_driver_lock, parse_tune, preflight
    from orchestrator.tracking import check_experiment_name, parse_tracking

    experiment = load_experiment(args.file, args.overrides)  # every mistake surfaces before Ray starts
    options = parse_tune(experiment.tune, experiment)
    tracking = parse_tracking(experiment.tracking)
    if args.extend and not args.name:
        raise ConfigError("--extend: needs --name, the existing sweep to add the file's new points to")
    name = args.name or Path(args.file).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--name: {name!r} is not a plain name; accepted: letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit (the sweep's folder goes under --storage)")
    target = _target(args)
    if args.extend:
        return _extend(args, experiment, options, tracking, name, target.storage)
    if (target.storage / name).exists():
        raise ConfigError(f"--name: a sweep named {name} already exists under {target.storage}; "
                          f"`clorch resume {name}` continues it, or pick another --name")
    check_tracking(target.tracking_uri)
    check_experiment_name(target.tracking_uri, name)
    stage_counts = preflight(experiment)  # every trial's data and learner (reads the data sets), before Ray
    num_stages = check_scheduler(options, stage_counts)
    if args.dry_run:
        return _dry_run(experiment, options, target, args.num_cpus)
    print(f"sweep {name}: ray {target.address or 'local'}, storage {target.storage / name}, "
          f"mlflow {target.tracking_uri}")
    connect(target, args.num_cpus)
    _encode_first(experiment, local=target.address is None)
    tuner = build_tuner(experiment, options, name, target.storage, target.tracking_uri, tracking,
                        local=target.address is None, num_stages=num_stages)
    hold_driver_lock(target.storage, name)
    results, _ = _fit(tuner, name, target)
    return _print_results(results, options.metric, options.mode)


def _encode_first(experiment, local: bool) -> None:
    """Before any trial starts: every embeddings file the trials read, encoded as Ray tasks over the nodes (on a
    local Ray without GPUs: in this process; the cache keys of sampled axes are unknown until their trials draw
    them: those trials encode their own)."""
    from orchestrator.encode import encode_configs

    configs, _ = experiment.cache_configs()
    encode_configs(configs, _say, local=local)


def _extend(args, experiment, options, tracking, name: str, storage: Path) -> int:
    """`clorch sweep FILE --name NAME --extend`: the file's new points run as one more part of sweep NAME, logged
    to the store the sweep logs to; every refusal comes before Ray starts and before anything is written."""
    import os

    from orchestrator.cluster import check_tracking, connect, resolve_target
    from orchestrator.sweep import (build_tuner, check_scheduler, hold_driver_lock, part_results, plan_extension,
                                    preflight, record_part, record_tracking_uri, state_dir, sweep_info, sweep_parts)
    from orchestrator.tracking import check_store

    extension = plan_extension(experiment, options, tracking, name, storage)
    info = sweep_info(storage, name)
    target = resolve_target(args.address, args.storage,
                            args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or info["tracking_uri"])
    check_tracking(target.tracking_uri)
    check_store(target.tracking_uri, state_dir(storage, name), name)
    num_stages = check_scheduler(options, preflight(experiment))
    trials = len(extension.points) * options.num_samples
    points = "; ".join(", ".join(f"{k}={v}" for k, v in p.items()) for p in extension.points)
    print(f"extending {name}: {len(extension.points)} new point(s) beside the {extension.ran} it ran, "
          f"{trials} trial(s) in {storage / extension.part}: {points}")
    if args.dry_run:
        return 0
    hold_driver_lock(storage, name)
    connect(target, args.num_cpus)
    _encode_first(experiment, local=target.address is None)
    tuner = build_tuner(experiment, options, name, storage, target.tracking_uri, tracking,
                        local=target.address is None, num_stages=num_stages, extension=extension)
    record_part(storage, name, extension, experiment.path)
    record_tracking_uri(storage, name, target.tracking_uri)
    fitted, _ = _fit(tuner, name, target)
    results = [r for part in sweep_parts(storage, name)
               for r in (fitted if part.name == extension.part else part_results(part))]
    return _print_results(results, options.metric, options.mode)


def _dry_run(experiment, options, target, num_cpus: int | None) -> int:
    """The sweep's plan on this cluster: a local Ray's size from --num-cpus (else this machine), a cluster's
    from Ray (joining it writes nothing)."""
    import os

    if target.address:
        import ray

        from orchestrator.cluster import check_reachable

        check_reachable(target.address)
        ray.init(address=target.address, log_to_driver=False, logging_level=logging.WARNING)
        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    else:
        import torch

        cpus, gpus = float(num_cpus or os.cpu_count() or 1), float(torch.cuda.device_count())
    from orchestrator.sweep import plan

    print("\n".join(plan(experiment, options, cpus, gpus)))
    return 0


def cmd_resume(args) -> int:
    import os

    from orchestrator.cluster import check_tracking, connect, resolve_target
    from orchestrator.sweep import (check_sweep, hold_driver_lock, open_trials, part_results, record_tracking_uri,
                                    restore_tuner, state_dir, sweep_info, sweep_parts)
    from orchestrator.tracking import check_store

    storage = _target(args).storage
    check_sweep(args.name, storage)  # a wrong name fails before Ray starts
    hold_driver_lock(storage, args.name)  # and so does a second driver
    info = sweep_info(storage, args.name)
    # the store the sweep was started with, unless told otherwise (a sweep that moved with a copy of its store)
    target = resolve_target(args.address, args.storage,
                            args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or info["tracking_uri"])
    check_tracking(target.tracking_uri)
    check_store(target.tracking_uri, state_dir(storage, args.name), args.name)
    parts = sweep_parts(target.storage, args.name)
    counts = {part: open_trials(part) for part in parts}  # (errored, unfinished) of each part
    todo = [part for part in parts if any(counts[part])] or parts[:1]  # an --extend made parts: each runs alone
    if args.restart_errored and not any(errored for errored, _ in counts.values()):
        print(f"--restart-errored: no trial of {args.name} errored; resuming it as without the flag")
    print(f"resuming {args.name}: storage {target.storage / args.name}, mlflow {target.tracking_uri}")
    connect(target, args.num_cpus)
    tuners = {part: restore_tuner(args.name, target.storage, target.tracking_uri, part.name, args.restart_errored)
              for part in todo}
    record_tracking_uri(target.storage, args.name, target.tracking_uri)
    fitted = {}
    for part, tuner in tuners.items():
        fitted[part], interrupted = _fit(tuner, args.name, target)
        if interrupted:  # the parts after it wait for the next resume
            break
    tune_options = info["tune"]
    results = [r for part in parts for r in (fitted[part] if part in fitted else part_results(part))]
    return _print_results(results, tune_options["metric"], tune_options["mode"])


def _fit(tuner, name: str, target):
    """tuner.fit() and whether a Ctrl-C interrupted it, with Tune's advice then (a Python call to Tuner.restore)
    replaced by clorch's."""
    from orchestrator.cluster import DropMessages

    tune_log = logging.getLogger("ray.tune.tune")
    advice = DropMessages("Experiment has been interrupted")
    tune_log.addFilter(advice)
    try:
        results = tuner.fit()
    finally:
        tune_log.removeFilter(advice)
    if advice.dropped:
        from orchestrator.sweep import state_dir, trial_summaries
        from orchestrator.tracking import mark_interrupted

        # a trial the pruner stopped is over, not interrupted
        unfinished = [s.trial for s in trial_summaries(results) if s.state not in ("done", "stopped")]
        mark_interrupted(target.tracking_uri, state_dir(target.storage, name), unfinished)
        where = f" --storage {target.storage}" + (f" --address {target.address}" if target.address else "")
        print(f"interrupted: finished stages are kept; continue with `clorch resume {name}{where}`", flush=True)
    return results, advice.dropped > 0


def cmd_status(args) -> int:
    from orchestrator.sweep import check_sweep, part_results, restore_tuner, state_dir, sweep_info, sweep_parts

    target = _target(args)
    check_sweep(args.name, target.storage)
    results = [*restore_tuner(args.name, target.storage).get_results(),
               *(r for part in sweep_parts(target.storage, args.name)[1:] for r in part_results(part))]
    tune_options = sweep_info(target.storage, args.name)["tune"]
    from orchestrator import leaderboard as lb
    from orchestrator.console import stage_line

    selection = lb.selection_metrics(tune_options["metric"])[0]  # the first of several, as the sweep's console
    for r in results:  # each trial's latest stage, as the sweep's own console printed it
        if (r.metrics or {}).get("stage") is not None:
            trial_id = r.metrics.get("trial_id") or Path(r.path).name
            print(stage_line(trial_id, r.config, r.metrics, selection))
    status = _print_results(results, tune_options["metric"], tune_options["mode"], status_only=True)
    _print_resume_points(results, state_dir(target.storage, args.name))
    return status


def _print_resume_points(results, own_dir: Path) -> None:
    """For every unfinished trial: the stage a resume continues after, or why it starts again from stage 1."""
    from orchestrator import checkpoints
    from orchestrator.sweep import trial_summaries

    for r, t in zip(results, trial_summaries(results)):
        if t.state == "done" or r.checkpoint is None:  # without a checkpoint, a resume starts at stage 1 anyway
            continue
        copies = checkpoints.copies_folder(own_dir, t.trial)
        state, _, skipped = checkpoints.inspect(checkpoints.candidates(Path(r.checkpoint.path), copies))
        why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        if state is not None:
            print(f"{t.trial}: a resume continues after stage {state['next_stage']}{why}")
        elif skipped:
            print(f"{t.trial}: cannot be continued, no stage checkpoint verifies{why}; a resume starts it again "
                  "from stage 1")


def _print_results(results, metric: str | list[str], mode: str | list[str], status_only: bool = False) -> int:
    """Every trial (finished ones ranked first, the others unranked below), then the configurations with
    seeds aggregated (with several selection metrics, those on the Pareto set marked and listed); exit status
    1 when a sweep (not a status query) left errors."""
    from orchestrator import leaderboard as lb
    from orchestrator.sweep import trial_summaries

    trials = trial_summaries(results)
    keys = sorted({k for t in trials for k in t.params})
    scores = lb.score_metrics(metric)
    rows = []
    for i, t in enumerate(lb.ranked_trials(trials, metric, mode), 1):
        rank = str(i) if t.state == "done" else "-"
        rows.append([rank, t.trial, t.state.upper(), f"{t.stages}/{t.total_stages or '?'}",
                     *(_cell(t.metrics.get(m)) for m in scores), *(str(t.params.get(k, "")) for k in keys),
                     "yes" if t.future_inputs else ""])
    print(lb.text_table(["#", "trial", "state", "stages", *scores, *keys, "future_inputs"], rows))
    groups, unranked = lb.rank(trials, metric, mode)
    if groups:
        print(f"\nconfigurations, mean ± std over seeds; {lb.selection_note(metric)}")
        config_keys = [k for k in keys if k not in lb.SEED_KEYS]
        several = isinstance(metric, list)
        table = [[str(r["rank"]), str(r["n"]), *(lb.mean_std(r[f"{m} mean"], r[f"{m} std"]) for m in scores),
                  *(str(r[k]) for k in config_keys), "yes" if r["future_inputs"] else "",
                  *(["yes" if r["pareto"] else ""] if several else [])]
                 for r in lb.group_rows(groups, metric, config_keys)]
        print(lb.text_table(["#", "n", *scores, *config_keys, "future_inputs", *(["pareto"] if several else [])],
                            table))
        if several:
            print(_pareto_line(groups, metric, mode))
    if unranked:
        print(f"{len(unranked)} unfinished trial(s) are not ranked (their metrics cover fewer stages)")
    errored = sum(t.state == "error" for t in trials)
    if errored and not status_only:
        print(f"{errored} trial(s) errored: `clorch resume NAME` continues them from their last stage "
              "(`--restart-errored`: from stage 1)")
    return 1 if errored and not status_only else 0


def _pareto_line(groups, metric: list[str], mode: list[str]) -> str:
    """Which configurations (by their # in the table) are on the Pareto set, and over which metrics."""
    from orchestrator import leaderboard as lb

    on = [f"#{i}" for i, g in enumerate(groups, 1) if g.pareto]
    return (f"Pareto set over {lb.with_directions(metric, mode)}: configuration(s) {', '.join(on) or 'none'}, "
            f"{len(on)} of {len(groups)} (no other is at least as good on every metric and better on one)")


def _cell(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4f}"


def cmd_report(args) -> int:
    from orchestrator.cluster import resolve_target
    from orchestrator.report import write_report
    from orchestrator.sweep import check_sweep, sweep_info

    storage = resolve_target(None, args.storage, None).storage
    check_sweep(args.name, storage)
    tune_options = sweep_info(storage, args.name)["tune"]
    metric = args.metric or tune_options["metric"]
    mode = args.mode or (tune_options["mode"] if metric == tune_options["metric"] else None)
    from orchestrator.report import HTML_FILE, default_out_dir

    out = Path(args.out) if args.out else default_out_dir(args.name)
    print(write_report(args.name, storage, out, metric, mode))
    print(f"report written to {out.resolve()}/ (open {HTML_FILE} in a browser)")
    return 0


def cmd_ui(args) -> int:
    import os
    import signal
    import socket
    import subprocess

    from orchestrator.cluster import resolve_target

    uri = resolve_target(None, None, args.tracking_uri).tracking_uri
    with socket.socket() as probe:  # a taken port is the user's to fix, not a server that dies in the background
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError:
            raise ConfigError(f"--port: 127.0.0.1:{args.port} is already in use; pick another --port") from None
    print(f"MLflow UI at http://127.0.0.1:{args.port} over {uri} (Ctrl-C stops it)", flush=True)
    # its own process group, so that stopping clorch stops the server and every worker it started
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(args.port)], start_new_session=True)

    stopped = []

    def stop(signum, frame) -> None:
        stopped.append(signum)
        os.killpg(server.pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        status = server.wait()
        return 0 if stopped else status  # stopped on request: a clean exit
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


COMMANDS = {"run": cmd_run, "cache": cmd_cache, "sweep": cmd_sweep, "resume": cmd_resume, "status": cmd_status,
            "report": cmd_report, "ui": cmd_ui}


def _log_to_console(quiet: bool) -> None:
    """Progress (info) to stdout, beside the tables; warnings and errors to stderr, so that a mistake is the one
    line there. Left alone when the process has configured logging already (a program embedding clorch)."""
    root = logging.getLogger()
    if root.handlers:
        return
    progress, problems = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    for handler in (progress, problems):
        handler.setFormatter(logging.Formatter("[clorch] %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clorch` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    _log_to_console(quiet=getattr(args, "quiet", False))
    from orchestrator.cluster import quiet_chosen_settings

    quiet_chosen_settings()  # before MLflow and Ray are imported: they read these once
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as e:
        print(f"clorch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clorch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
