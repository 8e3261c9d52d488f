"""MLflow tracking from the Tune driver: one parent run per sweep, one child run per trial.

Everything is logged from the driver process (a Tune callback), so a SQLite store never has two writers. The
trial-to-run map lives in clorch's folder beside Tune's experiment folder: a restored sweep re-attaches each
trial to its own child run instead of opening a duplicate.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ray import tune

from orchestrator.trial import resolve as resolve_config
from orchestrator.trial import train_run_folder
from workloads.config import ConfigError, flatten, to_dict
from workloads.metrics import DIRECTIONS, SPLITS, split_of

log = logging.getLogger(__name__)

RUN_MAP = "mlflow_runs.json"
MATRIX_FILE = "accuracy_matrix.json"  # a trial run's matrices, {split: R}; a heatmap PNG per split beside it
SUPERSEDED_BY = "clorch.superseded_by"  # tag of a trial's run that a restart from scratch replaced: the new run


@dataclass
class TrackingOptions:
    """The `tracking:` block of an experiment file."""

    codebooks: bool | int = True  # DKVB: keys once, values and key usage (npz + histogram) after every stage
    #                               (true), after every N-th stage and the last (N), or never (false)
    codebook_precision: Literal["float16", "float32"] = "float16"  # of the keys and values in those files
    log_model: bool = True  # the final learner as an MLflow logged model (safetensors + JSON, no pickle)
    register_model: str | None = None  # also register the final model under this name

    def codebooks_after(self, stage: int, num_stages: int | None) -> bool:
        """Whether the codebooks are logged after `stage` (from 0) of a stream of `num_stages`."""
        every = int(self.codebooks)  # true: 1, false: 0
        last = num_stages is not None and stage == num_stages - 1
        return every > 0 and ((stage + 1) % every == 0 or last)

    def codebooks_with_keys(self, stage: int, num_stages: int | None) -> bool:
        """Whether `stage` is the first whose codebooks are logged (the keys, frozen, are logged with it only)."""
        return stage == min(int(self.codebooks), num_stages or stage + 1) - 1


def parse_tracking(raw: dict) -> TrackingOptions:
    """Validate the `tracking:` block; errors name `tracking.<key>` and what is accepted."""
    from workloads.config import from_dict

    options = from_dict(TrackingOptions, raw or {}, "tracking")
    if not isinstance(options.codebooks, bool) and options.codebooks < 1:
        raise ConfigError(f"tracking.codebooks: got {options.codebooks}; accepted: true (after every stage), "
                          "false (never) or N >= 1 (after every N-th stage and the last)")
    return options


def load_state(folder: str) -> dict | None:
    """The run state in a trial's stage checkpoint folder, if it verifies (None if not)."""
    from orchestrator import checkpoints

    return checkpoints.newest_valid([Path(folder)], "tracking")[0]


def check_experiment_name(tracking_uri: str, name: str) -> None:
    """Before a new sweep: MLflow keeps a deleted experiment (and its name) until `mlflow gc`, and no run can be
    created in it; refuse the name with the ways out. A SQLite file that is not there yet holds no experiment."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        i = experiment.experiment_id
        raise ConfigError(f"--name: {tracking_uri} holds a deleted MLflow experiment named {name} (id {i}), which "
                          f"MLflow keeps until it is collected; accepted: another --name, or first restore it "
                          f"(MLFLOW_TRACKING_URI={tracking_uri} mlflow experiments restore --experiment-id {i}) or "
                          f"remove it for good (mlflow gc --backend-store-uri {tracking_uri} --experiment-ids {i})")


def check_store(tracking_uri: str, state_dir: Path, name: str) -> None:
    """Before a resume: the store at `tracking_uri` must hold the sweep's parent run (from the run map in
    `state_dir`), or the resume would open a second parent and duplicate child runs elsewhere."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = Path(state_dir) / RUN_MAP
    parent = json.loads(path.read_text()).get("parent") if path.exists() else None
    if parent is None:
        return  # nothing logged yet: the resume opens the parent run
    database = Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None
    try:  # a SQLite file that is not there holds nothing (and opening it would create it)
        run = MlflowClient(tracking_uri).get_run(parent) if database is None or database.exists() else None
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        raise ConfigError(f"--tracking-uri: {tracking_uri} holds no parent run {parent} of sweep {name}"
                          f"{' (it was deleted)' if run is not None else ''}; accepted: the store the sweep logged "
                          "to (a copy of it, if it moved with the storage)")


def mark_interrupted(tracking_uri: str, state_dir: Path, unfinished: list[str]) -> None:
    """After a Ctrl-C: the sweep's parent run and the child runs of its unfinished trials end KILLED (Tune
    reports the trials it stopped as terminated, and the parent would read FINISHED). A tracking failure
    here is a warning: `clorch resume` sets every status again."""
    from mlflow.tracking import MlflowClient

    path = Path(state_dir) / RUN_MAP
    runs = json.loads(path.read_text()) if path.exists() else {}
    targets = [runs.get("parent")] + [runs.get("trials", {}).get(t) for t in unfinished]
    try:
        client = MlflowClient(tracking_uri)
        for run_id in filter(None, targets):
            client.set_terminated(run_id, "KILLED")
    except Exception as e:  # noqa: BLE001 (any tracking failure)
        log.warning("could not mark the interrupted sweep's runs KILLED in MLflow: %s", _first_line(e))


def plan_restarts(state_dir: Path, trials: list) -> None:
    """Before a resume restarts errored Tune `trials` from scratch: Tune gives each a new trial id, and the trial
    that replaces one (the same config) gets a child run of its own, the old run being marked superseded."""
    from orchestrator.trial import config_digest

    runs = _read_map(Path(state_dir))
    plan = runs.setdefault("restarts", {})  # config digest -> ids of the errored trials restarted with it
    for trial in trials:
        waiting = plan.setdefault(config_digest(trial.config), [])
        if trial.trial_id not in waiting:
            waiting.append(trial.trial_id)
    _write_map(Path(state_dir), runs)


def _read_map(state_dir: Path) -> dict:
    path = state_dir / RUN_MAP
    return json.loads(path.read_text()) if path.exists() else {"parent": None, "trials": {}}


def _write_map(state_dir: Path, runs: dict) -> None:
    tmp = (state_dir / RUN_MAP).with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=1))
    tmp.replace(state_dir / RUN_MAP)


class MLflowTracking(tune.Callback):
    """Logs params, per-stage metrics (step = the stage's number, from 1), the accuracy matrix and run status to MLflow.

    Tune pickles its callbacks into the sweep's state and unpickles them on a restore. Where this one logs
    (the tracking URI, clorch's folder of the sweep) is left out of that state: `bind` sets it in the driver
    from the command line and the folder as they are now, before the Tuner is built or restored, so that a sweep
    whose storage moved logs to the store it is told and writes beside itself, never to where it was.
    """

    _bound: dict[str, tuple[str, str]] = {}  # sweep name -> (tracking URI, state folder), in this driver

    @classmethod
    def bind(cls, experiment: str, tracking_uri: str, state_dir: str) -> None:
        cls._bound[experiment] = (tracking_uri, state_dir)

    def __init__(self, tracking_uri: str, experiment: str, state_dir: str, options: TrackingOptions | None = None,
                 metric: str = "val/average_accuracy", mode: str = "max", sweep_id: str | None = None):
        self.bind(experiment, tracking_uri, state_dir)
        self.tracking_uri, self.experiment, self.state_dir = tracking_uri, experiment, state_dir
        self.sweep_id = sweep_id  # tag clorch.sweep_id of every run of this sweep (None: a sweep from before it)
        self.options = options or TrackingOptions()
        self.metric, self.mode = metric, mode  # the sweep's selection metric
        self._client = None
        self._attached: set[str] = set()  # child runs this driver already checked (or created)

    def __getstate__(self):  # no paths, no client (not picklable), no per-driver memory
        return {k: v for k, v in self.__dict__.items()
                if k not in ("tracking_uri", "state_dir", "_client", "_attached", "_outage", "_delay", "_retry_at",
                             "_uploader")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.experiment not in self._bound:
            raise RuntimeError(f"sweep {self.experiment}: its MLflow tracking was restored before "
                               "MLflowTracking.bind said where to log")
        self.tracking_uri, self.state_dir = self._bound[self.experiment]
        self._client, self._attached = None, set()

    @property
    def uploads(self):
        """The sweep's artifact writer (orchestrator.uploads), started with the first upload."""
        if getattr(self, "_uploader", None) is None:
            from mlflow.tracking import MlflowClient

            from orchestrator.uploads import SPOOL, Uploader

            _ = self.client  # sets MLflow's retry limits for the writer's client too
            self._uploader = Uploader(lambda: MlflowClient(self.tracking_uri), Path(self.state_dir) / SPOOL)
        return self._uploader

    # --- state that survives a driver restart: the map file, re-read on every access ---
    @property
    def _map_path(self) -> Path:
        return Path(self.state_dir) / RUN_MAP

    def _load_map(self) -> dict:
        return _read_map(Path(self.state_dir))

    def _save_map(self, runs: dict) -> None:
        _write_map(Path(self.state_dir), runs)

    @property
    def client(self):
        if self._client is None:
            import os

            from mlflow.tracking import MlflowClient

            # MLflow's client retries an unreachable server for minutes by default, holding up Tune's event loop
            # all the while; clorch keeps what fails in its outbox instead, so a few seconds of retries will do
            for variable, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                                    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                                    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
                os.environ.setdefault(variable, value)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _tagged_run(self, experiment_id: str, **tags: str) -> str | None:
        """The run of this sweep with these tags, if MLflow has one: how a run created by a driver that died
        before recording it in the map is found again instead of duplicated. Never a run a restart superseded."""
        if self.sweep_id is None:
            return None
        conditions = [f"tags.`clorch.sweep_id` = '{self.sweep_id}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        found = self.client.search_runs([experiment_id], " and ".join(conditions), max_results=20,
                                        order_by=["attributes.start_time ASC"])
        live = [r for r in found if SUPERSEDED_BY not in r.data.tags]
        return live[0].info.run_id if live else None

    def parent_run(self) -> str:
        """The sweep's parent run id: the map's, else the one MLflow holds with this sweep's tags, else new."""
        runs = self._load_map()
        if runs["parent"] is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            from orchestrator.leaderboard import selection_tags

            runs["parent"] = self._tagged_run(exp_id, **{"clorch.role": "sweep"})
            if runs["parent"] is None:
                tags = {"clorch.sweep": self.experiment, "clorch.role": "sweep", **selection_tags(self.metric),
                        **({"clorch.sweep_id": self.sweep_id} if self.sweep_id else {})}
                runs["parent"] = self.client.create_run(exp_id, run_name=self.experiment, tags=tags).info.run_id
            self._save_map(runs)
        return runs["parent"]

    def child_run(self, trial) -> str:
        """The trial's child run: the map's, else the one MLflow holds with this trial's tags, else a new one
        nested under the parent. Each child run carries the sweep's name and id, the trial id and its parent."""
        runs = self._load_map()
        run_id = runs["trials"].get(trial.trial_id)
        if run_id is None:
            parent = self.parent_run()
            exp_id = self.client.get_run(parent).info.experiment_id
            run_id = self._tagged_run(exp_id, **{"clorch.trial_id": trial.trial_id, "mlflow.parentRunId": parent})
            restarted = self._restarted(runs, trial, exp_id, parent)  # the errored trial this one starts over
            if run_id is None:
                run_id = self._create_child(exp_id, parent, trial, restarted[1] if restarted else None)
                self._attached.add(run_id)
            runs = self._load_map()
            runs["trials"][trial.trial_id] = run_id
            if restarted:
                self._supersede(runs, *restarted, trial.trial_id, run_id)
            self._save_map(runs)
        if run_id not in self._attached:  # re-attached after a restart: the run may be FAILED
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self._attached.add(run_id)
        return run_id

    def _restarted(self, runs: dict, trial, experiment_id: str, parent: str) -> tuple[str, str | None] | None:
        """(trial id, run id) of the errored trial that `trial`, new to the map, restarts from scratch (planned
        by `plan_restarts`: the same config under a new trial id), or None."""
        from orchestrator.trial import config_digest

        waiting = runs.get("restarts", {}).get(config_digest(trial.config)) or []
        old = next((t for t in waiting if t != trial.trial_id), None)
        if old is None:
            return None
        return old, runs["trials"].get(old) or self._tagged_run(
            experiment_id, **{"clorch.trial_id": old, "mlflow.parentRunId": parent})

    def _supersede(self, runs: dict, old_trial: str, old_run: str | None, trial_id: str, run_id: str) -> None:
        """The old run keeps its data, ends FAILED and names the run that replaced it; the map (`runs`, saved by
        the caller) forgets it, so that no lookup hands it back and the new run gets every stage (its model is
        looked up by the new run's id, so it is logged there too)."""
        if old_run is not None:
            self.client.set_tag(old_run, SUPERSEDED_BY, run_id)
            if self.client.get_run(old_run).info.status != "FAILED":
                self.client.set_terminated(old_run, "FAILED")
        runs["trials"].pop(old_trial, None)
        runs.setdefault("superseded", {})[old_trial] = {"run": old_run, "by_trial": trial_id, "by_run": run_id}
        runs.get("stages_logged", {}).pop(old_trial, None)
        plan = runs.get("restarts", {})
        for digest in [d for d, waiting in plan.items() if old_trial in waiting]:
            plan[digest] = [t for t in plan[digest] if t != old_trial]
            if not plan[digest]:
                del plan[digest]

    def _create_child(self, experiment_id: str, parent: str, trial, restart_of: str | None = None) -> str:
        from mlflow.entities import Param

        from orchestrator.sweep import trial_label
        from orchestrator.trial import resolve

        tags = {"mlflow.parentRunId": parent, "clorch.sweep": self.experiment, "clorch.trial_id": trial.trial_id,
                **({"clorch.sweep_id": self.sweep_id} if self.sweep_id else {}),
                **({"clorch.restart_of": restart_of} if restart_of else {})}
        # named by what the trial sweeps (the id is a tag): the runs page tells DKVB from DyTox at a glance
        run = self.client.create_run(experiment_id, run_name=trial_label(trial.config), tags=tags)
        config = resolve(trial.config)
        params = flatten(to_dict(config))
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        _best_effort("the trial's data set", self._log_dataset, run.info.run_id, config)
        return run.info.run_id

    def _log_dataset(self, run_id: str, config) -> None:
        """The data the trial trains on as an MLflow dataset input (context `train`): the source, the stream cut
        from it (the profile) and a digest of both with the source's fingerprint, the one its cache keys use
        (files' sizes and times; a changed data set gets a new digest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from workloads.data.sources import source_identity
        from workloads.features import digest

        data = config.data
        identity, stream = source_identity(data), to_dict(data)
        where = identity.get("root")
        dataset = Dataset(name=data.source, digest=digest({"source": identity, "stream": stream})[:16],
                          source_type="local" if where else "code",
                          source=where or f"{data.source} (generated or shipped with clorch's dependencies)",
                          profile=json.dumps({"stream": stream, "fingerprint": identity.get("fingerprint")},
                                             default=str)[:MAX_TAG])
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])

    # --- Tune hooks: each becomes one event, written to MLflow now or, while the store fails, queued ---------
    def setup(self, **info) -> None:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self.uploads.clear_spool()  # what a dead driver left queued; its matrices and models are checked at the end
        self._send({"kind": "resume"}, force=True)  # a resume also replays what an outage left queued

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._send({"kind": "start", **_trial_record(trial)})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        stage = int(result["stage"])
        for line in (result.get("warnings") or "").splitlines():  # the trial's warnings (orchestrator.trial)
            log.warning("trial %s, stage %d: %s", trial.trial_id, stage + 1, line)
        self._send({"kind": "result", **_trial_record(trial), "result": _plain(result)})
        if _runs_train_workers(trial) and self.options.codebooks_after(stage, result.get("num_stages")):
            folder = train_run_folder(self.state_dir, trial.trial_id)  # no Tune checkpoint: the Train run's
            if folder is not None:
                self._log_codebooks(trial, stage, result.get("num_stages"), folder)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._send({"kind": "complete", **_trial_record(trial)})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._send({"kind": "error", **_trial_record(trial), "error_file": getattr(trial, "error_file", None)})

    def on_experiment_end(self, trials, **info) -> None:
        self.uploads.drain()  # every queued artifact first: the end checks which matrices and models are missing
        self._send({"kind": "end", "trials": [_trial_record(t) for t in trials]}, force=True)
        self.uploads.close()
        left = self._outbox()
        if left:
            log.warning("MLflow at %s is still unreachable: %d write(s) wait in %s; `clorch resume %s` writes "
                        "them once it answers", self.tracking_uri, len(left), self._outbox_path, self.experiment)

    # --- the outbox: what could not be written, in order, replayed exactly once ------------------------------
    @property
    def _outbox_path(self) -> Path:
        return Path(self.state_dir) / OUTBOX

    def _outbox(self) -> list[dict]:
        path = self._outbox_path
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def _keep(self, events: list[dict]) -> None:
        if not events:
            self._outbox_path.unlink(missing_ok=True)
            return
        tmp = self._outbox_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in events))
        tmp.replace(self._outbox_path)

    def _send(self, event: dict, force: bool = False) -> None:
        """Write `event` to MLflow after whatever waits in the outbox; on any failure of the store keep both
        there, say so once per outage, and try again after a back-off (5 s doubling to 60 s), at the sweep's
        end (`force`) or on `clorch resume`. A tracking outage never stops the sweep."""
        waiting = self._outbox()
        if waiting and not force and time.monotonic() < getattr(self, "_retry_at", 0.0):
            self._keep(waiting + [event])
            return
        queue = waiting + [event]
        try:
            while queue:
                self._apply(queue[0])
                queue.pop(0)
        except Exception as e:  # noqa: BLE001 (an unreachable server, a locked database, a 5xx...)
            self._keep(queue)
            delay = min(2 * getattr(self, "_delay", 2.5), 60.0)
            self._delay, self._retry_at = delay, time.monotonic() + delay
            if not getattr(self, "_outage", False):
                log.warning("MLflow at %s failed (%s: %s); %d write(s) wait in %s and are retried",
                            self.tracking_uri, type(e).__name__, _first_line(e), len(queue), self._outbox_path)
            self._outage = True
            return
        self._keep([])
        if getattr(self, "_outage", False):
            log.warning("MLflow at %s answers again; every queued write is in", self.tracking_uri)
        self._outage, self._delay = False, 2.5

    def _apply(self, event: dict) -> None:
        """One event, written to MLflow; safe to repeat (a replay after a partial write logs nothing twice)."""
        kind = event["kind"]
        if kind == "resume":
            parent = self.parent_run()
            if self.client.get_run(parent).info.status != "RUNNING":  # a resumed sweep runs again
                self.client.update_run(parent, status="RUNNING")
            return
        if kind == "end":
            self._end([_TrialView(**t) for t in event["trials"]])
            return
        trial = _TrialView(**{k: event[k] for k in _TrialView.__dataclass_fields__})
        if kind == "start":
            self.child_run(trial)
        elif kind == "result":
            self._log_stage(trial, event["result"])
        elif kind == "complete":
            self._complete(trial)
        elif kind == "error":
            run_id = self.child_run(trial)
            if event.get("error_file") and Path(event["error_file"]).exists():
                self.client.log_artifact(run_id, event["error_file"])
            self.client.set_terminated(run_id, "FAILED")
            self._attached.discard(run_id)  # a retry (max_failures) or a resume marks it RUNNING again

    def _log_stage(self, trial, result: dict) -> None:
        from mlflow.entities import Metric

        run_id = self.child_run(trial)
        stage = int(result["stage"])
        if result.get("warnings"):  # new even when the stage is a replay (a checkpoint that did not verify)
            _best_effort("the trial's warnings", self.client.log_text, run_id, result["warnings"] + "\n",
                         f"warnings/stage_{stage + 1}_{int(result.get('timestamp', 0))}.txt")
        runs = self._load_map()
        logged = runs.setdefault("stages_logged", {}).get(trial.trial_id, -1)
        if stage <= logged:  # a stage replayed after a restart was logged the first time it ran
            return
        stamp = int(result.get("timestamp", 0) * 1000)
        # MLflow's step is the stage's number, from 1, as in the console and the report (result["stage"] is
        # Tune's index, from 0)
        metrics = [Metric(k, float(v), stamp, stage + 1) for k, v in result.items()
                   if _is_stage_metric(k, v)]
        tags = []
        if logged < 0:  # the protocol is the trial's, the same at every stage: tag it once
            from mlflow.entities import RunTag

            validation = result.get("protocol.validation", 0)
            tags = [RunTag("protocol.future_inputs", str(bool(result.get("protocol.future_inputs"))).lower()),
                    RunTag("protocol.validation", f"{validation:g}" if validation else "none"),
                    RunTag("protocol.axis", result.get("protocol.axis") or "stage")]
        # A write can reach the store and still fail for its writer (a server killed before it answered, a
        # driver killed before it recorded the stage below): the store itself says whether this stage is in.
        # A log_batch is one transaction, so one of its metrics tells.
        if metrics and any(m.step == stage + 1 for m in self.client.get_metric_history(run_id, metrics[0].key)):
            metrics, tags = [], []
        if metrics or tags:
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        runs = self._load_map()
        runs.setdefault("stages_logged", {})[trial.trial_id] = stage
        self._save_map(runs)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        last = trial.last_result or {}
        stage = int(last.get("stage", 0))
        if self.options.codebooks_after(stage, last.get("num_stages")):
            self._log_codebooks(trial, stage, last.get("num_stages"), Path(checkpoint.path))

    def _log_codebooks(self, trial, stage: int, num_stages: int | None, checkpoint: Path) -> None:
        """Queue the codebooks of the stage checkpoint in `checkpoint` (skipped, with a warning, when the store
        is down or the queue is full: a finished run's last codebooks and keys are checked for at the sweep's end,
        those in between are for inspection)."""
        if getattr(self, "_outage", False):
            return
        try:
            run_id = self.child_run(trial)
        except Exception as e:  # noqa: BLE001 (the store failed: the outbox has the stage's metrics)
            log.warning("could not log codebooks to MLflow: %s", _first_line(e))
            return
        spool = self.uploads.spool(checkpoint)
        if spool is None:
            return
        first = self.options.codebooks_with_keys(stage, num_stages)  # keys: logged once
        from orchestrator.uploads import Upload

        def upload(client) -> None:
            model = _stage_model(spool, stage)
            if model is not None:
                self.log_codebooks(run_id, stage, model, client, with_keys=first)

        self.uploads.submit(Upload(f"the codebooks of trial {trial.trial_id} after stage {stage + 1}", upload, spool),
                            may_drop=True)

    def _complete(self, trial) -> None:
        run_id = self.child_run(trial)
        self._queue_matrices(trial, run_id)
        if self.options.log_model:
            self._queue_model(trial, run_id)
        self.client.set_terminated(run_id, "FINISHED")

    def _queue_matrices(self, trial, run_id: str, if_missing: bool = False) -> None:
        """Queue the accuracy matrices of the trial's last result for its run; `if_missing`: only where the run
        lacks one of their files (an upload that failed in an outage, or a killed driver left queued)."""
        from orchestrator.uploads import Upload

        result = trial.last_result or {}
        matrices = {split: json.loads(result[f"{split}/accuracy_matrix"]) for split in SPLITS
                    if f"{split}/accuracy_matrix" in result}
        if not matrices:
            return
        axis = result.get("protocol.axis") or "stage"
        files = {MATRIX_FILE, *(f"accuracy_matrix_{split}.png" for split in matrices)}

        def upload(client) -> None:
            if not if_missing or not files <= {a.path for a in client.list_artifacts(run_id)}:
                self.log_matrices(run_id, matrices, client, axis)

        self.uploads.submit(Upload(f"the accuracy matrices of trial {trial.trial_id}", upload), may_drop=False)

    def _queue_final_codebooks(self, trial, run_id: str) -> None:
        """Queue the codebooks after a finished trial's last stage, and its keys, where its run lacks them (an
        upload skipped on a full queue, failed in an outage, or left queued by a killed driver)."""
        from orchestrator.uploads import Upload

        result = trial.last_result or {}
        if "stage" not in result:
            return
        stage, num_stages = int(result["stage"]), result.get("num_stages")
        if not self.options.codebooks_after(stage, num_stages):
            return
        spool = self._spool_last_checkpoint(trial)
        if spool is None:
            return

        def upload(client) -> None:
            have = {a.path for a in client.list_artifacts(run_id, "codebooks")}
            keys = "codebooks/keys.npy" not in have
            if not keys and f"codebooks/stage_{stage + 1}.npz" in have:
                return
            model = _stage_model(spool, stage)
            if model is not None:
                self.log_codebooks(run_id, stage, model, client, with_keys=keys)

        self.uploads.submit(Upload(f"the last codebooks of trial {trial.trial_id}", upload, spool), may_drop=False)

    def _spool_last_checkpoint(self, trial) -> Path | None:
        """The trial's last checkpoint (a Train run's for trials on Train workers) linked into the upload spool;
        None where it has none."""
        folder = (train_run_folder(self.state_dir, trial.trial_id) if _runs_train_workers(trial)
                  else Path(trial.checkpoint) if trial.checkpoint is not None else None)
        return self.uploads.spool(folder) if folder is not None else None

    def _queue_model(self, trial, run_id: str) -> None:
        """Queue the trial's final model for its run, from its last checkpoint (a Train run's for trials on
        Train workers); the upload logs it only if the run has no finished model yet (exactly once)."""
        from orchestrator.uploads import Upload

        spool = self._spool_last_checkpoint(trial)
        if spool is None:
            log.warning("trial %s: no checkpoint to log its final model from", trial.trial_id)
            return
        config = resolve_config(trial.config)
        self.uploads.submit(Upload(f"the final model of trial {trial.trial_id}",
                                   lambda client: self.log_model(run_id, config, spool, client), spool),
                            may_drop=False)

    def log_codebooks(self, run_id: str, stage: int, model: dict, client=None, with_keys: bool | None = None) -> None:
        """DKVB after a stage: values and key usage (npz) and a key-usage histogram; the keys (frozen) with the
        first stage logged. Keys and values in `tracking.codebook_precision`."""
        import numpy as np

        client = client or self.client
        dtype = np.float16 if getattr(self.options, "codebook_precision", "float16") == "float16" else np.float32
        usage = model["bottleneck.usage"].numpy()
        with tempfile.TemporaryDirectory() as folder:
            if with_keys if with_keys is not None else stage == 0:
                np.save(Path(folder) / "keys.npy", model["bottleneck.keys"].numpy().astype(dtype))
                client.log_artifact(run_id, str(Path(folder) / "keys.npy"), "codebooks")
            number = stage + 1  # file names by the stage's number, from 1
            path = Path(folder) / f"stage_{number}.npz"
            np.savez_compressed(path, values=model["bottleneck.values"].numpy().astype(dtype),
                                usage=usage.astype(np.uint32) if usage.max(initial=0) < 2**32 else usage)
            client.log_artifact(run_id, str(path), "codebooks")
            fig = _figure()
            ax = fig.subplots()
            used = usage[usage > 0]
            ax.hist(np.log10(used) if used.size else [], bins=40)
            ax.set_xlabel("log10 selections of a key (used keys)")
            ax.set_ylabel("keys")
            ax.set_title(f"after stage {number}: {used.size} of {usage.size} keys used")
            fig.savefig(Path(folder) / f"usage_stage_{number}.png", dpi=90, bbox_inches="tight")
            client.log_artifact(run_id, str(Path(folder) / f"usage_stage_{number}.png"), "codebooks")

    def log_model(self, run_id: str, config, checkpoint: Path, client=None) -> None:
        """The learner in the stage checkpoint folder `checkpoint` as the run's MLflow logged model, without
        pickle: weights in safetensors, config in JSON (orchestrator.models); registered when
        tracking.register_model is set. Nothing is logged when the run has a finished model already, and one
        that an earlier driver left unfinished is marked FAILED."""
        from orchestrator.models import save_model

        client = client or self.client
        experiment_id = client.get_run(run_id).info.experiment_id
        existing = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if any(str(m.status).endswith("READY") for m in existing):
            return
        state = load_state(str(checkpoint))
        if state is None:
            log.warning("run %s: the checkpoint for its final model does not verify; no model logged", run_id)
            return
        for stale in existing:  # an upload cut short (a driver killed mid-way)
            client.finalize_logged_model(stale.model_id, "FAILED")
        model = client.create_logged_model(experiment_id, name="model", source_run_id=run_id, model_type="clorch")
        with tempfile.TemporaryDirectory() as folder:
            save_model(Path(folder), config, state)
            client.log_model_artifacts(model.model_id, folder)
        client.finalize_logged_model(model.model_id, "READY")
        if self.options.register_model:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.register_model(model.model_uri, self.options.register_model)

    def _end(self, trials) -> None:
        parent = self.parent_run()
        # what an upload that failed (an outage) or a killed driver's queue left out: matrices, the last
        # codebooks and final models
        runs = self._load_map()["trials"]
        for trial in trials:
            if trial.status == "TERMINATED" and trial.trial_id in runs:
                self._queue_matrices(trial, runs[trial.trial_id], if_missing=True)
                self._queue_final_codebooks(trial, runs[trial.trial_id])
                if self.options.log_model:
                    self._queue_model(trial, runs[trial.trial_id])
        self.uploads.drain()
        trials = [*trials, *self._other_parts(trials)]  # the leaderboard and the status are the whole sweep's
        _best_effort("the sweep's leaderboard", self.log_leaderboard, parent, trials)
        # FINISHED only when every trial is: a trial that errored fails the sweep, one left unfinished (an
        # interrupt, a stop) leaves it KILLED until `clorch resume` runs it again
        status = ("FAILED" if any(t.status == "ERROR" for t in trials) else
                  "FINISHED" if all(t.status == "TERMINATED" for t in trials) else "KILLED")
        self.client.set_terminated(parent, status)

    def _other_parts(self, trials) -> list:
        """The trials of the sweep's other parts (a sweep grown by `clorch sweep --extend` runs each part as a Tune
        experiment of its own), which the Tune experiment ending now does not see."""
        from orchestrator.sweep import extended_trials

        known = {t.trial_id for t in trials}
        try:
            found = extended_trials(Path(self.state_dir))
        except Exception as e:  # noqa: BLE001 (a part whose state cannot be read: this part's trials still count)
            log.warning("the sweep's other parts could not be read (%s); the parent run sees this part only",
                        _first_line(e))
            return []
        return [_TrialView(**_trial_record(t)) for t in found if t.trial_id not in known]

    def log_leaderboard(self, run_id: str, trials) -> None:
        """On the parent run: configurations ranked on the selection metric, seeds aggregated (`leaderboard.json`,
        an MLflow table), the best configuration's means and stds as metrics, and the protocol as tags; with
        several selection metrics also the Pareto set (`pareto.json`, tags `pareto.metrics`, `pareto.configs`)."""
        from mlflow.entities import Metric

        from orchestrator import leaderboard as lb
        from orchestrator.sweep import live_trial_summaries

        summaries = live_trial_summaries(trials)
        groups, _ = lb.rank(summaries, self.metric, self.mode)
        keys = sorted({k for s in summaries for k in s.params if k not in lb.SEED_KEYS})
        rows = lb.group_rows(groups, self.metric, keys)
        future = any(s.future_inputs for s in summaries)
        self.client.set_tag(run_id, "protocol.future_inputs", str(future).lower())
        if not rows:
            return
        import pandas as pd

        table = pd.DataFrame([{k: (str(v) if k in keys else v) for k, v in r.items()} for r in rows])
        self._replace_table(run_id, table, "leaderboard.json")
        if "pareto" in table:
            self._log_pareto(run_id, table[table["pareto"]].drop(columns="pareto"), keys)
        best = groups[0]
        metrics = {"best/n": float(best.n)}
        for m in lb.score_metrics(self.metric):
            mean, std = best.stats(m)
            metrics[f"best/{m}_mean"], metrics[f"best/{m}_std"] = mean, std
        now = int(time.time() * 1000)
        # a std of n = 1 is nan: left out rather than logged as a number
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if v == v])
        self.client.set_tag(run_id, "best.config", ", ".join(f"{k}={best.params.get(k)}" for k in keys) or "base")
        self.client.set_tag(run_id, "best.trials", " ".join(t.trial for t in best.trials))
        axis = next((r["protocol.axis"] for t in trials for r in [t.last_result or {}] if r.get("protocol.axis")),
                    "stage")
        _best_effort("the sweep's comparison figures", self._log_comparison, run_id, groups, axis)

    def _log_comparison(self, run_id: str, groups, axis: str) -> None:
        """The report's comparison figures on the parent run (every configuration in one picture), their curves
        read back from the child runs' per-stage history."""
        from orchestrator.report import comparison_figures

        runs = self._load_map()["trials"]
        for t in (t for group in groups for t in group.trials if t.trial in runs):
            history = self.client.get_metric_history(runs[t.trial], "test/accuracy_on_seen_classes")
            by_step = {m.step: m.value for m in history}  # a stage logged again: the latest
            t.seen = [by_step[k] for k in sorted(by_step)]
        with tempfile.TemporaryDirectory() as folder:
            for path in comparison_figures(groups, axis, Path(folder)):
                self.client.log_artifact(run_id, str(path), "comparison")

    def _log_pareto(self, run_id: str, table, keys: list[str]) -> None:
        """The Pareto set of a sweep with several selection metrics: its configurations' rows (`pareto.json`),
        the metrics and directions it is over and its configurations (tags)."""
        from orchestrator import leaderboard as lb

        self._replace_table(run_id, table, "pareto.json")
        configs = "; ".join(", ".join(f"{k}={row[k]}" for k in keys) or "base" for _, row in table.iterrows())
        self.client.set_tag(run_id, "pareto.metrics", lb.with_directions(self.metric, self.mode))
        self.client.set_tag(run_id, "pareto.configs", configs[:MAX_TAG])

    def _replace_table(self, run_id: str, table, path: str) -> None:
        """An MLflow table that replaces the run's earlier one of that name: log_table appends to it, and a resumed
        or extended sweep would list each earlier table above the current one."""
        if path not in {a.path for a in self.client.list_artifacts(run_id)}:
            self.client.log_table(run_id, table, path)  # the first: also tags the run for MLflow's table view
        else:  # in log_table's own format (pandas' "split" JSON), overwritten
            self.client.log_text(run_id, table.to_json(orient="split", index=False, date_format="iso"), path)

    def log_matrices(self, run_id: str, matrices: dict[str, list[list[float]]], client=None,
                     axis: str = "stage") -> None:
        """The accuracy matrix of each split as JSON (`accuracy_matrix.json`: {split: R}) and as a heatmap
        PNG per split (`accuracy_matrix_<split>.png`), its axes labelled by `axis` (stage, or domain)."""
        client = client or self.client
        client.log_dict(run_id, matrices, MATRIX_FILE)
        for split, matrix in matrices.items():
            from matplotlib.colors import PowerNorm

            n = len(matrix)
            fig = _figure(figsize=(2 + 0.75 * n, 1.5 + 0.6 * n))
            ax = fig.subplots()
            # one fixed scale for every run, stretched at the top where accuracies sit: 0.9 and 1.0 differ
            norm = PowerNorm(gamma=3, vmin=0, vmax=1)
            image = ax.imshow(matrix, norm=norm, cmap="viridis")
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    if value == value:  # nan: not evaluated
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if norm(value) > 0.6 else "white")
            ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
            ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
            ax.set_xlabel(f"evaluated on {axis} j")
            ax.set_ylabel(f"after training {axis} i")
            ax.set_title(f"{split} accuracy")
            fig.colorbar(image, ax=ax, ticks=[0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"accuracy_matrix_{split}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                client.log_artifact(run_id, str(path))


def _stage_model(folder: Path, stage: int) -> dict | None:
    """The DKVB model tensors of the stage checkpoint in `folder` when it is `stage`'s (a Train run's newest
    checkpoint may still be the previous stage's), else None."""
    state = load_state(str(folder))
    if state is None or state["next_stage"] != stage + 1 or "bottleneck.values" not in state["learner"]["model"]:
        return None
    return state["learner"]["model"]


def _runs_train_workers(trial) -> bool:
    return (trial.config.get("resources", {}).get("num_workers") or 0) > 0


def _best_effort(what: str, fn, *args) -> None:
    """Artifacts are worth a warning, not a trial: a failure to log one leaves the trial's result standing."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 (any tracking failure)
        log.warning("could not log %s to MLflow: %s", what, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _figure(**kwargs):
    from orchestrator.report import agg_figure  # the one helper; report.py imports no Ray

    return agg_figure(**kwargs)


MAX_TAG = 5000  # characters of a tag value kept (every MLflow store takes this many)
RUN_METRICS = ("loss", "seconds", "memory_size")  # the rest are `val/...` and `test/...`


def _is_stage_metric(key: str, value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if split_of(key):
        base = key.partition("/")[2]
        return base in DIRECTIONS or base.startswith("accuracy_stage_")
    return key in RUN_METRICS


OUTBOX = "mlflow_outbox.jsonl"  # MLflow writes that failed, in order, beside the run map


@dataclass
class _TrialView:
    """What the tracking needs of a Tune trial, as plain data: it goes into the outbox and comes back."""

    trial_id: str
    config: dict
    status: str
    last_result: dict
    checkpoint: str | None  # the folder of its last Tune checkpoint


def _trial_record(trial) -> dict:
    return {"trial_id": trial.trial_id, "config": trial.config, "status": trial.status,
            "last_result": _plain(trial.last_result or {}),
            "checkpoint": trial.checkpoint.path if trial.checkpoint is not None else None}


def _plain(result: dict) -> dict:
    """A Tune result's numbers and strings (what tracking reads), JSON-safe."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
