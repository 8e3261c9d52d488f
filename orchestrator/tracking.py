"""MLflow tracking from the Tune driver: one parent run per sweep, one child run per trial.

Everything is logged from the driver process (a Tune callback), so a SQLite store never has two writers. The
trial-to-run map lives in clorch's folder beside Tune's experiment folder: a restored sweep re-attaches each
trial to its own child run instead of opening a duplicate.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ray import tune

from workloads.config import flatten, to_dict

log = logging.getLogger(__name__)

RUN_MAP = "mlflow_runs.json"


class MLflowTracking(tune.Callback):
    """Logs params, per-stage metrics (step = stage), the accuracy matrix and run status to MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, state_dir: str):
        self.tracking_uri, self.experiment, self.state_dir = tracking_uri, experiment, state_dir
        self._client = None

    # --- state that survives a driver restart: the map file, re-read on every access ---
    @property
    def _map_path(self) -> Path:
        return Path(self.state_dir) / RUN_MAP

    def _load_map(self) -> dict:
        return json.loads(self._map_path.read_text()) if self._map_path.exists() else {"parent": None, "trials": {}}

    def _save_map(self, runs: dict) -> None:
        tmp = self._map_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        tmp.replace(self._map_path)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self):  # Tune pickles callbacks with the experiment state; the client is not picklable
        return {**self.__dict__, "_client": None}

    def parent_run(self) -> str:
        """The sweep's parent run id, created on first use."""
        runs = self._load_map()
        if runs["parent"] is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            runs["parent"] = self.client.create_run(exp_id, run_name=self.experiment,
                                                    tags={"clorch.sweep": self.experiment}).info.run_id
            self._save_map(runs)
        return runs["parent"]

    def child_run(self, trial) -> str:
        """The trial's child run: the one in the map, else a new one nested under the parent."""
        runs = self._load_map()
        run_id = runs["trials"].get(trial.trial_id)
        if run_id is not None:
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        parent = self.parent_run()
        exp_id = self.client.get_run(parent).info.experiment_id
        run = self.client.create_run(exp_id, run_name=f"trial-{trial.trial_id}",
                                     tags={"mlflow.parentRunId": parent, "clorch.trial_id": trial.trial_id})
        from orchestrator.trial import resolve
        from mlflow.entities import Param

        params = flatten(to_dict(resolve(trial.config)))
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        runs = self._load_map()
        runs["trials"][trial.trial_id] = run.info.run_id
        self._save_map(runs)
        return run.info.run_id

    # --- Tune hooks ---
    def setup(self, **info) -> None:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self.parent_run()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric

        run_id = self.child_run(trial)
        stage = int(result["stage"])
        runs = self._load_map()
        logged = runs.setdefault("stages_logged", {}).get(trial.trial_id, -1)
        if stage <= logged:  # a stage replayed after a restart was logged the first time it ran
            return
        stamp = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k, float(v), stamp, stage) for k, v in result.items()
                   if _is_stage_metric(k, v)]
        self.client.log_batch(run_id, metrics=metrics)
        runs["stages_logged"][trial.trial_id] = stage
        self._save_map(runs)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.child_run(trial)
        result = trial.last_result or {}
        if "accuracy_matrix" in result:
            self.log_matrix(run_id, json.loads(result["accuracy_matrix"]))
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.child_run(trial)
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(error_file).exists():
            self.client.log_artifact(run_id, error_file)
        self.client.set_terminated(run_id, "FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        failed = any(t.status == "ERROR" for t in trials)
        self.client.set_terminated(self.parent_run(), "FAILED" if failed else "FINISHED")

    def log_matrix(self, run_id: str, matrix: list[list[float]]) -> None:
        """The accuracy matrix as JSON and as a heatmap PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.client.log_dict(run_id, {"accuracy_matrix": matrix}, "accuracy_matrix.json")
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(matrix), 1 + 0.5 * len(matrix)))
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("evaluated on stage j")
        ax.set_ylabel("after training stage i")
        fig.colorbar(image, ax=ax)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "accuracy_matrix.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            self.client.log_artifact(run_id, str(path))
        plt.close(fig)


STAGE_METRICS = ("accuracy_on_seen_classes", "average_accuracy", "average_incremental_accuracy", "forgetting",
                 "bwt", "loss", "seconds")


def _is_stage_metric(key: str, value) -> bool:
    return (key in STAGE_METRICS or key.startswith("accuracy_stage_")) and isinstance(value, (int, float))
