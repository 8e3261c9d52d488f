"""Per-trial overhead of a clorch sweep against a bare Ray Tune function trainable doing the same work.

Both run N trials of one tiny workload (DKVB 8 x 32 keys, d_k 4, on digits in 5 stages of 2 classes, 1 epoch
per stage; the trials differ only in the learning rate) on the same local Ray (2 CPUs, 1 CPU per trial):

- clorch: `build_tuner(...).fit()`: config resolution per trial, a checkpoint (learner state) per stage, and
  MLflow tracking from the driver to a SQLite store;
- bare: `tune.Tuner(fn)`, where fn calls `run_stream` and `tune.report`s once per stage, with no checkpoint
  and no MLflow.

Each mode runs once untimed first (imports, Ray worker start-up, MLflow's database schema, key cache), then
`--repeats` timed runs (the fastest is kept). The difference per trial is what clorch adds; the table ends with
the time of one real stage (the quickstart's DKVB 64 x 256, 20 epochs), which that overhead should stay small
next to.

`--stores` times clorch against three MLflow stores instead, each with the bare Tuner alongside: the local
SQLite file the driver writes itself (the embedded default: the reference), an `mlflow server` over SQLite and
an `mlflow server` over PostgreSQL (a throwaway server in a temporary folder, as the tests start it: Debian's
postgresql package and psycopg2 needed), both servers with one worker on 127.0.0.1. It prints the driver's
overhead per stage over the bare Tuner for each store and its ratio to the reference's, measured in the same run.

    python bench/sweep_overhead.py               # from the repository root: N = 4 trials, 1 timed run per mode
    python bench/sweep_overhead.py --n 8 --repeats 3
    python bench/sweep_overhead.py --stores      # SQLite file vs mlflow server over SQLite vs over PostgreSQL
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def base_config(cache_dir: Path) -> dict:
    """The tiny workload both modes run."""
    return {"name": "overhead", "seed": 0, "cache_dir": str(cache_dir),
            "data": {"source": "digits", "classes_per_stage": 2},
            "learner": {"name": "dkvb", "num_codebooks": 8, "num_keys": 32, "key_dim": 4},
            "train": {"epochs": 1, "lr": 0.1}}


def learning_rates(n: int) -> list[float]:
    return [round(0.1 * (i + 1), 3) for i in range(n)]


def run_clorch(tmp: Path, name: str, n: int, tracking_uri: str | None = None) -> float:
    """Seconds for N trials through clorch's own Tuner (checkpoints, MLflow at `tracking_uri`, by default a
    SQLite file)."""
    from orchestrator.config import load_experiment
    from orchestrator.sweep import build_tuner, parse_tune

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": base_config(tmp / "cache"),
                                    "sweep": {"train.lr": {"grid": learning_rates(n)}}}))
    started = time.perf_counter()
    experiment = load_experiment(path)
    results = build_tuner(experiment, parse_tune({}), name, tmp / "clorch_runs",
                          tracking_uri or "sqlite:///" + str(tmp / "mlflow.db")).fit()
    seconds = time.perf_counter() - started
    assert not results.errors, results.errors
    return seconds


def bare_trial(config: dict) -> None:
    """The same workload as a plain Tune function: one report per stage, nothing else."""
    from ray import tune

    from workloads.config import parse_run_config
    from workloads.runner import run_stream

    raw = {**config["base"], "train": {**config["base"]["train"], "lr": config["lr"]}}

    def on_stage_end(stage: int, m: dict, state: dict) -> None:
        tune.report({"stage": stage, "val/average_accuracy": m["val/average_accuracy"]})

    run_stream(parse_run_config(raw), on_stage_end=on_stage_end)


def run_bare(tmp: Path, name: str, n: int) -> float:
    """Seconds for N trials through a bare `tune.Tuner`."""
    from ray import tune

    started = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(bare_trial, {"cpu": 1}),
                       param_space={"base": base_config(tmp / "cache"), "lr": tune.grid_search(learning_rates(n))},
                       tune_config=tune.TuneConfig(metric="val/average_accuracy", mode="max"),
                       run_config=tune.RunConfig(name=name, storage_path=str(tmp / "bare_runs"), verbose=1))
    results = tuner.fit()
    seconds = time.perf_counter() - started
    assert not results.errors, results.errors
    return seconds


def real_stage_seconds(cache_dir: Path) -> tuple[float, float]:
    """The quickstart experiment in-process, run twice: (first stage of the first run, fastest of the second).

    The first stage of a fresh process pays first-call costs; the fastest stage is the least disturbed by other
    load on the machine.
    """
    from orchestrator.config import load_experiment
    from workloads.runner import run_stream

    config = load_experiment(REPO / "search_spaces" / "quickstart.yaml", [f"cache_dir={cache_dir}"]).base
    first = run_stream(config).stage_seconds[0]
    return first, min(run_stream(config).stage_seconds)


REFERENCE = "SQLite file (driver writes)"


def compare_stores(tmp: Path, n: int, repeats: int) -> None:
    """`--stores`: clorch against the local SQLite file (the reference), an mlflow server over SQLite and one over
    PostgreSQL, with the bare Tuner timed alongside each; prints a table of the driver's overhead per stage."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))  # the tests' real servers: PostgreSQL in a temp folder, mlflow server
    from pg_server import MLflowServer, PostgresServer

    postgres = PostgresServer()
    servers = []
    try:
        postgres.start()
        for backend, folder in ((f"sqlite:///{tmp / 'server.db'}", "sqlite-server"),
                                (postgres.create_database("bench"), "pg-server")):
            servers.append(MLflowServer(backend, tmp / folder, workers=1).start())
        stores = {REFERENCE: "sqlite:///" + str(tmp / "mlflow.db"), "mlflow server over SQLite": servers[0].uri,
                  "mlflow server over PostgreSQL": servers[1].uri}
        for i, uri in enumerate(stores.values()):  # each store's schema, first experiment and connections
            run_clorch(tmp, f"warmup-{i}", 1, uri)
        run_bare(tmp, "warmup-bare", 1)
        clorch, bare = {label: [] for label in stores}, {label: [] for label in stores}
        for r in range(repeats):  # interleaved, a bare run after each store's: a busy spell hits every mode
            for i, (label, uri) in enumerate(stores.items()):
                clorch[label].append(run_clorch(tmp, f"store{i}-{r}", n, uri))
                bare[label].append(run_bare(tmp, f"bare{i}-{r}", n))
    finally:
        for server in servers:
            server.stop()
        postgres.close()
    stages = 5 * n
    baseline = min(min(times) for times in bare.values())  # the same workload each time: its least disturbed run
    overhead = {label: (min(clorch[label]) - baseline) / stages for label in stores}
    print(f"\n{n} trials of DKVB 8x32 on digits (5 stages, 1 epoch each), 2 at a time on a local Ray with 2 CPUs; "
          f"fastest of {repeats} timed run(s) per store; servers on 127.0.0.1 with 1 worker; bare Tuner "
          f"{baseline:.2f} s (fastest of {repeats * len(stores)})")
    print(f"{'tracking store':<32} {'clorch s':>9} {'x reference':>12} {'overhead s/stage':>17} {'x reference':>12}")
    for label in stores:
        ratio = f"{overhead[label] / overhead[REFERENCE]:.2f}x" if overhead[REFERENCE] > 0 else "-"
        print(f"{label:<32} {min(clorch[label]):>9.2f} {min(clorch[label]) / min(clorch[REFERENCE]):>11.2f}x "
              f"{overhead[label]:>+17.3f} {ratio:>12}")
    print(f"reference: {REFERENCE}; overhead per stage = (clorch - bare Tuner) / {stages} stages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="trials per sweep")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the fastest is kept)")
    parser.add_argument("--stores", action="store_true",
                        help="compare tracking stores: SQLite file, mlflow server over SQLite, over PostgreSQL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    # address="local": a fresh Ray, never a cluster some `ray start` left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.stores:
        with tempfile.TemporaryDirectory() as folder:
            compare_stores(Path(folder), args.n, args.repeats)
        ray.shutdown()
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        run_clorch(tmp, "warmup-clorch", 1)
        run_bare(tmp, "warmup-bare", 1)
        clorch, bare = [], []
        for i in range(args.repeats):  # interleaved, so that a busy spell on the machine hits both modes
            clorch.append(run_clorch(tmp, f"clorch-{i}", args.n))
            bare.append(run_bare(tmp, f"bare-{i}", args.n))
        clorch, bare = min(clorch), min(bare)
        ray.shutdown()
        first_stage, stage = real_stage_seconds(tmp / "cache")

    extra = (clorch - bare) / args.n
    print(f"\n{args.n} trials of DKVB 8x32 on digits (5 stages, 1 epoch each), 2 at a time on a local Ray "
          f"with 2 CPUs; fastest of {args.repeats} timed run(s) per mode")
    print(f"{'mode':<8} {'total s':>8} {'s per trial':>12}")
    print(f"{'bare':<8} {bare:>8.2f} {bare / args.n:>12.2f}")
    print(f"{'clorch':<8} {clorch:>8.2f} {clorch / args.n:>12.2f}")
    print(f"clorch's extra overhead per trial: {extra:+.2f} s ({extra / 5:+.3f} s per stage); "
          f"clorch / bare: {clorch / bare:.2f}x")
    print(f"reference, one real stage: quickstart (DKVB 64x256, 20 epochs, in-process) {stage:.2f} s "
          f"(fastest of 5; a fresh process's first stage {first_stage:.2f} s); keep clorch's extra overhead per trial "
          "small next to a real stage")


if __name__ == "__main__":
    main()
