"""One Tune trial: resolve its config, run the stage loop, report after every stage with a checkpoint.

`num_workers: 0` runs the workload in the trial's own process and reports through `ray.tune.report`.
`num_workers: N >= 1` runs it in N Ray Train workers (a `TorchTrainer` started by this driver function, GPUs
where asked): each trains on its slice of every batch with gradients averaged (workloads.distributed), rank 0
reports through `ray.train.report`, and Tune hears it through `TuneReportCallback`. The Train
run is named `train-<trial id>` so that a restored trial finds its own last stage checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from orchestrator import checkpoints
from workloads.config import ConfigError

log = logging.getLogger(__name__)

STAGE_REPORT = "stage_report"  # in a stage checkpoint: the metrics its stage reported (to report them again)


def resolve(trial_config: dict):
    """The RunConfig of a trial: the base config with the trial's sampled sweep values set."""
    from orchestrator.config import with_values
    from workloads.config import parse_run_config

    return parse_run_config(with_values(trial_config["base"], trial_config.get("sweep") or {}))


def scalar_metrics(stage: int, m: dict) -> dict[str, float]:
    """What a stage report carries: the stage index, scalar metrics (`val/...`, `test/...`), each stage's
    accuracy by name from the stage at which it was first trained, and the protocol as numbers (its axis, stage
    or domain, as a word)."""
    from workloads.metrics import SPLITS

    out = {"stage": stage, **{k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "stage"}}
    for split in SPLITS:
        for j, acc in enumerate(m.get(f"{split}/stage_accuracies", [])[:stage + 1]):  # later stages: untrained
            out[f"{split}/accuracy_stage_{j + 1}"] = acc  # stages by number, from 1, as everywhere a person reads
    out["protocol.validation"] = float(m["protocol"]["validation"])
    out["protocol.future_inputs"] = int(m["protocol"]["future_inputs"])
    out["protocol.axis"] = m["protocol"].get("axis", "stage")  # what R's rows and columns are: stages or domains
    return out


def run_workload(trial_config: dict, checkpoint, report: Callable[[dict, Any], None]) -> None:
    """Run the stream from `checkpoint` (or from the start), calling report(metrics, checkpoint) per stage."""
    import ray
    import torch
    from ray.tune import Checkpoint

    from workloads.distributed import world
    from workloads.runner import run_stream
    from workloads.threads import use_threads

    with TrialWarnings() as warnings:  # from here on, clorch's warnings travel with the next report
        # as many torch threads as CPUs Ray reserved for this process (the trial's, or this Train worker's)
        log.info(use_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
        config = resolve(trial_config)
        # a GPU only with a reservation: Ray counts what it reserved, never what a trial takes on its own
        device = trial_device(config.device, ray.get_gpu_ids(), torch.cuda.is_available())
        config = dataclasses.replace(config, device=device)
        node = ray.get_runtime_context().get_node_id()  # which node ran each stage (`clorch status`, tests)
        copies = checkpoints.copies_folder(trial_config["state_dir"], trial_config["trial_id"])
        resume_state = resumed_from = None
        if checkpoint is not None:
            # The newest stage checkpoint that verifies (Ray's, else clorch's copies), else from scratch; one
            # warning. Without a checkpoint from Ray the copies stay unused: one written just before a driver
            # died may be of a stage whose report Tune never recorded; resuming after it would skip that report.
            resume_state, resumed_from = checkpoints.newest_valid(
                checkpoints.candidates(Path(checkpoint.path), copies), f"trial {trial_config['trial_id']}")
        fail_at = trial_config.get("fail_at_stage")  # test-only: raise once, at this stage, on the first attempt
        marker = _failure_marker(trial_config["state_dir"], trial_config["trial_id"])
        restarted = _failure_marker(trial_config["state_dir"], "restarted-" + config_digest(trial_config))

        def send(stage_report: dict, state: dict) -> None:
            with tempfile.TemporaryDirectory() as folder:
                checkpoints.write(Path(folder), state)
                report({**stage_report, "node_id": node, "data_parallel_workers": world()[1],
                        "torch_threads": torch.get_num_threads(),
                        "device": device, "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
                        "warnings": warnings.take()},
                       Checkpoint.from_directory(folder))

        if resumed_from is not None and Path(resumed_from) != Path(checkpoint.path) \
                and STAGE_REPORT in resume_state:
            # Resumed from one of clorch's copies, since Ray's checkpoint did not verify or is gone (a killed
            # driver's experiment state can name one Ray deleted since): the copy's stage report may never have
            # reached Tune, if the driver died before processing it. It goes again, as it was made at that stage
            # (older checkpoints hold none); the tracking logs each stage once.
            send(resume_state[STAGE_REPORT], resume_state)

        def on_stage_end(stage: int, m: dict, state: dict) -> None:
            state = {**state, STAGE_REPORT: {
                **scalar_metrics(stage, m), **{f"{split}/accuracy_matrix": json.dumps(scores["accuracy_matrix"])
                                               for split, scores in state["splits"].items()}}}
            if world()[0] == 0:  # one writer of the copies, whatever the number of data-parallel workers
                checkpoints.keep_copy(copies, stage, state)
            send(state[STAGE_REPORT], state)
            if fail_at is not None and stage + 1 == fail_at and not marker.exists() and not restarted.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise RuntimeError(f"planned failure before stage {fail_at} (tune.fail_at_stage, a test option)")

        run_stream(config, resume_state=resume_state, on_stage_end=on_stage_end)


def config_digest(trial_config: dict) -> str:
    """A short digest of a trial's config (base, swept values, run settings): what Tune keeps of an errored trial
    that it restarts from scratch under a new trial id (`clorch resume --restart-errored`)."""
    own = {k: v for k, v in trial_config.items() if k not in ("trial_id", "state_dir")}  # added by run_trial
    return hashlib.sha256(json.dumps(own, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _failure_marker(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / "failures" / name


def mark_restart(state_dir: str | Path, trial_config: dict, trial_id: str) -> None:
    """Before errored trial `trial_id` restarts from scratch: its planned failure (tune.fail_at_stage) happened
    already, and the trial that replaces it, under a new id with the same config, does not raise again."""
    if _failure_marker(state_dir, trial_id).exists():
        restarted = _failure_marker(state_dir, "restarted-" + config_digest(trial_config))
        restarted.parent.mkdir(parents=True, exist_ok=True)
        restarted.touch()


def trial_device(configured: str, gpu_ids: list, cuda_available: bool) -> str:
    """The device a trial runs on: CUDA only when Ray reserved a GPU for it (`gpu_ids`), whatever torch sees on
    the node, since a trial on an unreserved GPU is one Ray does not count and stacks others onto."""
    if configured == "cpu" or not gpu_ids:
        if configured == "cuda":
            raise ConfigError("device: cuda, but Ray reserved no GPU for this trial; accepted: auto or cpu, or "
                              "tune.resources.use_gpu: true")
        return "cpu"
    if not cuda_available:  # a node that declares GPUs torch cannot use (a CPU build of torch, a test node)
        log.warning("Ray reserved GPU(s) %s for this trial, but torch sees no CUDA device here; it runs on the CPU",
                    ",".join(map(str, gpu_ids)))
        return "cpu"
    return "cuda"


class TrialWarnings(logging.Handler):
    """Warnings that clorch's code logs in a trial process (a cache rebuilt, a checkpoint skipped), handed to the
    next stage report: Ray keeps a trial's own log in its worker logs, so the report carries them to the
    driver, which prints them and logs them to the trial's MLflow run (orchestrator.tracking)."""

    LOGGERS = ("workloads", "orchestrator")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.pending: list[str] = []
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(record.getMessage())

    def take(self) -> str:
        """The warnings since the last call, one a line ('' if none)."""
        text, self.pending = "\n".join(self.pending), []
        return text

    def __enter__(self) -> "TrialWarnings":
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        self.close()


def train_run_folder(state_dir: str, trial_id: str) -> Path | None:
    """The newest stage checkpoint folder of a trial's Train run (trials with num_workers >= 1 keep their
    checkpoints there, not with Tune), unverified (its reader verifies it); None before the first."""
    found = checkpoints.candidates(None, Path(state_dir) / "train" / f"train-{trial_id}")
    return found[0] if found else None


def run_trial(trial_config: dict, state_dir: str | None = None) -> None:
    """The Tune trainable: a driver function for one trial. `state_dir`, clorch's folder of the sweep, is bound
    when the Tuner is built or restored (orchestrator.sweep._trainable), never frozen into the trial's config,
    so that a sweep whose storage moved writes to where it is now."""
    from ray import tune

    trial_config = {**trial_config, "trial_id": tune.get_context().get_trial_id(),
                    "state_dir": state_dir or trial_config["state_dir"]}  # older sweeps kept it in the config
    workers = trial_config["resources"]["num_workers"]
    if workers == 0:
        run_workload(trial_config, tune.get_checkpoint(), lambda m, c: tune.report(m, checkpoint=c))
        return
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def per_worker(cfg: dict) -> None:
        rank = ray.train.get_context().get_world_rank()

        def report(metrics: dict, checkpoint) -> None:
            ray.train.report(metrics, checkpoint=checkpoint if rank == 0 else None)

        run_workload(cfg, ray.train.get_checkpoint(), report)

    resources = trial_config["resources"]
    trainer = TorchTrainer(
        per_worker, train_loop_config=trial_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=resources["use_gpu"],
            resources_per_worker={"CPU": resources["cpus_per_worker"],
                                  **({"GPU": resources["gpus_per_trial"]} if resources.get("gpus_per_trial") else {})}),
        run_config=ray.train.RunConfig(name=f"train-{trial_config['trial_id']}",
                                       storage_path=os.path.join(trial_config["state_dir"], "train"),
                                       # the last stage's checkpoint is all Ray needs (clorch keeps copies)
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       callbacks=[TuneReportCallback()]))
    trainer.fit()
