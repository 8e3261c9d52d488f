"""Bad input, as a careless or hostile user gives it: experiment files, data files and command-line flags.

Every case must end in exit status 2 and exactly one line on stderr, `clorch: error: ...`, that names the
offending key, flag or file and says what is accepted; no traceback; and nothing written: no storage folder,
no MLflow store or run, no cache file, no output file (the working directory, where all of those default to,
is compared before and after). Cases marked `ray` are refused after a local Ray has started (what the cluster
has is known only then); they too leave nothing behind.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.cli import main

OK_BASE = ("  data: {source: digits, classes_per_stage: 2}\n"
           "  learner: {name: dkvb, num_codebooks: 4, num_keys: 16, key_dim: 4}\n"
           "  train: {epochs: 1}\n")


@dataclass
class Case:
    name: str
    argv: list[str]  # {d} is the case's working directory
    says: tuple[str, ...]  # fragments of the one error line: the key or file, and what is accepted
    files: dict[str, str | Callable[[Path], None]] = field(default_factory=dict)  # written before the run
    ray: bool = False  # refused only once a local Ray runs
    skip: str | None = None  # why this case cannot be shown on this machine


def exp(body: str = "", base: str = OK_BASE) -> dict:
    """An experiment file exp.yaml: the tiny OK base with `body` after it (top-level blocks, or base keys
    indented by two spaces to extend the base)."""
    return {"exp.yaml": "base:\n" + base + body}


def base_with(line: str) -> dict:
    """exp.yaml whose base has one more (or one replaced) line, e.g. `train: {lr: fast}`."""
    key = line.split(":")[0]
    kept = "".join(l + "\n" for l in OK_BASE.splitlines() if not l.strip().startswith(key + ":"))
    return exp(base=kept + f"  {line}\n")


def npz(spoil: Callable[[dict], None] | None = None, **over) -> Callable[[Path], None]:
    """A writer of a 4-class npz data file (12 train, 8 test vectors), spoiled by `spoil` or `over`."""
    def write(path: Path) -> None:
        rng = np.random.default_rng(0)
        arrays = {"x_train": rng.random((12, 5)), "y_train": np.arange(12) % 4,
                  "x_test": rng.random((8, 5)), "y_test": np.arange(8) % 4, **over}
        if spoil is not None:
            spoil(arrays)
        np.savez(path, **arrays)
    return write


def set_value(key: str, index, value) -> Callable[[dict], None]:
    def spoil(arrays: dict) -> None:
        arrays[key] = arrays[key].astype(float)
        arrays[key][index] = value
    return spoil


def image_folder(classes: dict[str, int]) -> Callable[[Path], None]:
    """An image-folder tree <path>/<class>/<i>.png with `classes` images per class."""
    def write(path: Path) -> None:
        for name, count in classes.items():
            folder = path / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(folder / f"{i}.png")
    return write


def deleted_experiment(name: str) -> Callable[[Path], None]:
    """A SQLite MLflow store holding experiment `name`, deleted (MLflow keeps it, soft-deleted)."""
    def write(path: Path) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{path}")
        client.delete_experiment(client.create_experiment(name))
    return write


def existing_sweep(axes: dict | None = None) -> Callable[[Path], None]:
    """The files by which commands know sweep `s` under ./clorch_runs, as `clorch sweep` leaves them for the OK
    base over `axes` (default: seed 0 and 1 on a grid); the sweep's Tune state itself is never read."""
    def write(path: Path) -> None:
        import json

        import yaml

        from orchestrator.sweep import parse_tune, resolve_resources
        from orchestrator.tracking import TrackingOptions
        from workloads.config import to_dict

        options = parse_tune({})
        resolve_resources(options, 0)
        options.max_concurrent_trials = 2
        (path / ".clorch" / "s").mkdir(parents=True)
        (path / "s").mkdir()
        (path / "s" / "tuner.pkl").write_bytes(b"not read")
        (path / ".clorch" / "s" / "sweep.json").write_text(json.dumps({
            "file": "exp.yaml", "base": yaml.safe_load("base:\n" + OK_BASE)["base"], "tune": to_dict(options),
            "sweep": axes or {"seed": {"grid": [0, 1]}}, "tracking_uri": f"sqlite:///{path.parent / 'mlflow.db'}",
            "tracking": to_dict(TrackingOptions()), "id": "0" * 32}))
    return write


EXTEND = ["sweep", "{d}/exp.yaml", "--name", "s", "--extend"]
NPZ_RUN = "  data: {source: npz, root: {d}/bad.npz, classes_per_stage: 2}\n  learner: {name: linear}\n" \
          "  train: {epochs: 1}\n"
SWEEP = "sweep:\n  seed: {grid: [0, 1]}\n"
NO_GPU = "this machine has a GPU" if torch.cuda.is_available() else None

CASES = [
    # --- experiment files: the file itself ---------------------------------------------------------------------
    Case("missing file", ["run", "{d}/nope.yaml"], ("nope.yaml: experiment file not found",)),
    Case("not YAML", ["sweep", "{d}/exp.yaml"], ("exp.yaml", "not valid YAML at line"), {"exp.yaml": "base: [1, 2\n"}),
    Case("unknown top-level key", ["sweep", "{d}/exp.yaml"], ("unknown top-level key 'bsae'", "accepted: "),
         {"exp.yaml": "bsae: {}\n"}),
    Case("base not a mapping", ["run", "{d}/exp.yaml"], ("base: expected a mapping",), {"exp.yaml": "base: [1, 2]\n"}),
    Case("sweep block not a mapping", ["sweep", "{d}/exp.yaml"], ("sweep: expected a mapping",), exp("sweep: 3\n")),
    # --- experiment files: the base config ---------------------------------------------------------------------
    Case("unknown learner key", ["run", "{d}/exp.yaml"], ("learner.codebooks: unknown key", "accepted keys"),
         base_with("learner: {name: dkvb, codebooks: 4}")),
    Case("unknown base key", ["sweep", "{d}/exp.yaml"], ("trian: unknown key", "accepted keys: "),
         exp("  trian: {}\n")),
    Case("lr not a number", ["run", "{d}/exp.yaml"], ("train.lr: got 'fast'", "accepted: a number"),
         base_with("train: {lr: fast}")),
    Case("lr NaN", ["sweep", "{d}/exp.yaml"], ("train.lr: got nan", "accepted: a finite number"),
         base_with("train: {lr: .nan}")),
    Case("lr infinite", ["run", "{d}/exp.yaml"], ("train.lr: got inf", "accepted: a finite number"),
         base_with("train: {lr: .inf}")),
    Case("lr negative", ["sweep", "{d}/exp.yaml"], ("train.lr", "> 0"), base_with("train: {lr: -0.1}")),
    Case("lr zero", ["run", "{d}/exp.yaml"], ("train.lr", "> 0"), base_with("train: {lr: 0}")),
    Case("momentum negative", ["sweep", "{d}/exp.yaml"], ("train.momentum", ">= 0"),
         base_with("train: {momentum: -0.5}")),
    Case("weight decay negative", ["run", "{d}/exp.yaml"], ("train.weight_decay", ">= 0"),
         base_with("train: {weight_decay: -1}")),
    Case("grad_clip negative", ["sweep", "{d}/exp.yaml"], ("train.grad_clip", "must be > 0"),
         base_with("train: {grad_clip: -1}")),
    Case("epochs zero", ["run", "{d}/exp.yaml"], ("train.epochs", "positive integer"), base_with("train: {epochs: 0}")),
    Case("epochs fractional", ["sweep", "{d}/exp.yaml"], ("train.epochs: got 2.5", "accepted: an integer"),
         base_with("train: {epochs: 2.5}")),
    Case("batch size zero", ["run", "{d}/exp.yaml"], ("train.batch_size", "positive"),
         base_with("train: {batch_size: 0}")),
    Case("optimizer unknown", ["sweep", "{d}/exp.yaml"], ("train.optimizer: got 'rmsprop'", "accepted: one of"),
         base_with("train: {optimizer: rmsprop}")),
    Case("value_dim zero", ["run", "{d}/exp.yaml"], ("learner.value_dim", "positive integer"),
         base_with("learner: {name: dkvb, value_dim: 0}")),
    Case("learner unknown", ["sweep", "{d}/exp.yaml"], ("learner.name: unknown learner 'gpt'", "accepted: dkvb"),
         base_with("learner: {name: gpt}")),
    Case("backbone unknown", ["run", "{d}/exp.yaml"], ("backbone.name: unknown backbone 'vgg'", "accepted: "),
         exp("  backbone: {name: vgg}\n")),
    Case("key_init unknown", ["sweep", "{d}/exp.yaml"], ("learner.key_init: got 'magic'", "accepted: one of"),
         base_with("learner: {name: dkvb, key_init: magic}")),
    Case("topk above num_keys", ["run", "{d}/exp.yaml"], ("learner.topk: 9 exceeds learner.num_keys",),
         base_with("learner: {name: dkvb, num_keys: 4, topk: 9}")),
    Case("codebooks too large", ["sweep", "{d}/exp.yaml"],
         ("learner.num_codebooks x learner.num_keys: 4096 x 100000000 codebook entries need",),
         base_with("learner: {name: dkvb, num_codebooks: 4096, num_keys: 100000000}")),
    Case("data source unknown", ["run", "{d}/exp.yaml"], ("data.source: got 'mnist'", "accepted: one of"),
         base_with("data: {source: mnist}")),
    Case("stage class twice", ["sweep", "{d}/exp.yaml"], ("data.stages[1]: class 1 appears twice",),
         base_with("data: {source: digits, stages: [[0, 1], [1, 2]]}")),
    Case("stage class absent", ["sweep", "{d}/exp.yaml"], ("data.stages[1]: class 12 has no samples",
                                                            "classes present: [0, 1"),
         base_with("data: {source: digits, stages: [[0, 1], [2, 12]]}")),
    Case("classes_per_stage zero", ["run", "{d}/exp.yaml"], ("data.classes_per_stage", "positive"),
         base_with("data: {source: digits, classes_per_stage: 0}")),
    Case("classes_per_stage above classes", ["sweep", "{d}/exp.yaml"],
         ("data.classes_per_stage: 11 exceeds the 10 classes present",),
         base_with("data: {source: digits, classes_per_stage: 11}")),
    Case("validation 1.5", ["run", "{d}/exp.yaml"], ("data.validation", "[0, 1)"),
         base_with("data: {source: digits, validation: 1.5}")),
    Case("validation negative", ["sweep", "{d}/exp.yaml"], ("data.validation", "[0, 1)"),
         base_with("data: {source: digits, validation: -0.1}")),
    Case("class order unknown", ["run", "{d}/exp.yaml"], ("data.class_order", "cifar100_order1"),
         base_with("data: {source: digits, class_order: order_zero}")),
    Case("class order repeats", ["sweep", "{d}/exp.yaml"], ("data.class_order", "twice"),
         base_with("data: {source: digits, class_order: [0, 1, 1, 2, 3, 4, 5, 6, 7, 8]}")),
    Case("seed above 64 bits", ["run", "{d}/exp.yaml", "--set", "seed=1180591620717411303424"],
         ("seed: must be an integer in [0, 2**63)",), exp()),
    Case("seed negative", ["sweep", "{d}/exp.yaml"], ("seed: must be an integer in [0, 2**63)",),
         exp("  seed: -1\n")),
    Case("device unknown", ["run", "{d}/exp.yaml"], ("device: got 'tpu'", "accepted: "), exp("  device: tpu\n")),
    Case("device cuda without GPU", ["run", "{d}/exp.yaml"], ("device: cuda, but this machine has no CUDA GPU",
                                                              "accepted here: auto or cpu"),
         exp("  device: cuda\n"), skip=NO_GPU),
    Case("device cuda in a sweep without GPUs", ["sweep", "{d}/exp.yaml"],
         ("device: cuda, but the sweep's trials get no GPU", "accepted: auto or cpu"),
         exp("  device: cuda\n"), ray=True, skip=NO_GPU),
    Case("preset renamed", ["run", "{d}/exp.yaml"], ("dkvb_paper", "dkvb_paper_model"),
         {"exp.yaml": "base:\n  preset: dkvb_paper\n"}),
    Case("preset unknown", ["sweep", "{d}/exp.yaml"], ("preset", "'nope'", "accepted: "),
         {"exp.yaml": "base:\n  preset: nope\n"}),
    Case("memory size negative", ["run", "{d}/exp.yaml"], ("rehearsal.memory_size", ">= 0"),
         exp("  rehearsal: {memory_size: -5}\n")),
    Case("memory selection unknown", ["sweep", "{d}/exp.yaml"], ("rehearsal.selection: got 'best'",
                                                                  "accepted: one of"),
         exp("  rehearsal: {memory_size: 20, selection: best}\n")),
    Case("--set without =", ["run", "{d}/exp.yaml", "--set", "train.lr"], ("--set: expected dotted.key=value, got 'train.lr'",), exp()),
    Case("--set unknown key", ["sweep", "{d}/exp.yaml", "--set", "train.lrr=1"], ("train.lrr: unknown key",), exp()),
    Case("--set bad value", ["run", "{d}/exp.yaml", "--set", "train.epochs=many"],
         ("train.epochs: got 'many'", "accepted: an integer"), exp()),
    # --- experiment files: sweep, tune and tracking blocks -----------------------------------------------------
    Case("sweep key unknown", ["sweep", "{d}/exp.yaml"], ("sweep.learner.num_keyz", "unknown key"),
         exp("sweep:\n  learner.num_keyz: {grid: [1, 2]}\n")),
    Case("grid empty", ["sweep", "{d}/exp.yaml"], ("sweep.seed: grid needs a non-empty list",),
         exp("sweep:\n  seed: {grid: []}\n")),
    Case("uniform inverted", ["sweep", "{d}/exp.yaml"], ("sweep.train.lr: uniform bounds are inverted",),
         exp("sweep:\n  train.lr: {uniform: [1.0, 0.1]}\n")),
    Case("axis without a kind", ["sweep", "{d}/exp.yaml"], ("sweep.seed", "grid"), exp("sweep:\n  seed: 5\n")),
    Case("grid value out of range", ["sweep", "{d}/exp.yaml"], ("sweep.train.lr", "train.lr", "> 0"),
         exp("sweep:\n  train.lr: {grid: [0.1, -1]}\n")),
    Case("scheduler unknown", ["sweep", "{d}/exp.yaml"], ("tune.scheduler: got 'hyperband'",
                                                          "accepted: one of 'fifo', 'asha'"),
         exp("tune:\n  scheduler: hyperband\n")),
    Case("tune key unknown", ["sweep", "{d}/exp.yaml"], ("tune.num_samplez: unknown key",),
         exp("tune:\n  num_samplez: 3\n")),
    Case("num_samples zero", ["sweep", "{d}/exp.yaml"], ("tune.num_samples: must be an integer >= 1, got 0",),
         exp("tune:\n  num_samples: 0\n")),
    Case("cpus_per_trial zero", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.cpus_per_trial: must be an integer >= 1, got 0",),
         exp("tune:\n  resources: {cpus_per_trial: 0}\n")),
    Case("cpus_per_worker zero", ["sweep", "{d}/exp.yaml"], ("tune.resources.cpus_per_worker: must be > 0",),
         exp("tune:\n  resources: {num_workers: 1, cpus_per_worker: 0}\n")),
    Case("num_workers negative", ["sweep", "{d}/exp.yaml"], ("tune.resources.num_workers: must be >= 0",),
         exp("tune:\n  resources: {num_workers: -1}\n")),
    Case("use_gpu without workers", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.use_gpu: true with num_workers 0 needs gpus_per_trial",
          "accepted: gpus_per_trial (e.g. 0.25), or num_workers >= 1"),
         exp("tune:\n  resources: {num_workers: 0, use_gpu: true}\n")),
    Case("gpus_per_trial 1.5", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.gpus_per_trial: got 1.5", "accepted: a fraction in (0, 1]"),
         exp("tune:\n  resources: {gpus_per_trial: 1.5}\n")),
    Case("gpus_per_trial zero", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.gpus_per_trial: got 0", "accepted: a fraction in (0, 1]"),
         exp("tune:\n  resources: {gpus_per_trial: 0}\n")),
    Case("gpus_per_trial with use_gpu false", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.gpus_per_trial: set, but use_gpu is false",),
         exp("tune:\n  resources: {gpus_per_trial: 0.5, use_gpu: false}\n")),
    Case("max_concurrent_trials zero", ["sweep", "{d}/exp.yaml"],
         ("tune.max_concurrent_trials: must be an integer >= 1, got 0",), exp("tune:\n  max_concurrent_trials: 0\n")),
    Case("max_failures negative", ["sweep", "{d}/exp.yaml"], ("tune.max_failures: must be an integer >= 0, got -1",),
         exp("tune:\n  max_failures: -1\n")),
    Case("metric unknown", ["sweep", "{d}/exp.yaml"], ("tune.metric: 'accuracy' is not a metric clorch reports",),
         exp("tune:\n  metric: accuracy\n")),
    Case("metric without split", ["sweep", "{d}/exp.yaml"], ("tune.metric", "name the split: val/average_accuracy"),
         exp("tune:\n  metric: average_accuracy\n")),
    Case("val metric without validation", ["sweep", "{d}/exp.yaml"], ("tune.metric", "test/average_accuracy"),
         exp("  data: {source: digits, classes_per_stage: 2, validation: 0}\n")),
    Case("mode unknown", ["sweep", "{d}/exp.yaml"], ("tune.mode: got 'sideways'", "accepted: one of"),
         exp("tune:\n  mode: sideways\n")),
    Case("optuna with a grid axis", ["sweep", "{d}/exp.yaml"],
         ("tune.search: optuna samples every axis and cannot cross the grid axis sweep.seed",
          "accepted: choice axes"), exp("sweep:\n  seed: {grid: [0, 1]}\ntune:\n  search: optuna\n")),
    Case("asha over streams of different lengths", ["sweep", "{d}/exp.yaml"],
         ("tune.scheduler: asha compares trials stage by stage", "streams of 2 and 5 stages", "accepted: fifo"),
         exp("sweep:\n  data.classes_per_stage: {grid: [2, 5]}\ntune:\n  scheduler: asha\n")),
    Case("metric named twice", ["sweep", "{d}/exp.yaml"], ("tune.metric: val/bwt is named twice",
                                                           "accepted: each metric once"),
         exp("tune:\n  metric: [val/bwt, val/bwt]\n")),
    Case("one mode for two metrics", ["sweep", "{d}/exp.yaml"],
         ("tune.mode: 1 mode(s) for 2 metric(s)", "accepted: one mode (max or min) per metric"),
         exp("tune:\n  metric: [val/average_accuracy, val/forgetting]\n  mode: max\n")),
    Case("asha with two metrics", ["sweep", "{d}/exp.yaml"],
         ("tune.scheduler: asha stops trials on one metric, but tune.metric names 2", "accepted: fifo"),
         exp("tune:\n  metric: [val/average_accuracy, val/forgetting]\n  scheduler: asha\n")),
    Case("optuna sampler unknown", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.sampler: unknown sampler 'annealing'", "accepted: tpe, random, cmaes, gp, qmc, nsga2"),
         exp("tune:\n  search: optuna\n  optuna: {sampler: annealing}\n")),
    Case("optuna sampler without optuna search", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.sampler: only search: optuna draws trials with Optuna's sampler", "accepted: search: optuna"),
         exp("tune:\n  optuna: {sampler: tpe}\n")),
    Case("multi-objective sampler on one metric", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.sampler: nsga2 trades off several metrics, but tune.metric names one",
          "accepted for one metric: tpe, random, cmaes, gp, qmc"),
         exp("tune:\n  search: optuna\n  optuna: {sampler: nsga2}\n")),
    Case("single-objective sampler on two metrics", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.sampler: cmaes works on one metric, but tune.metric names 2",
          "accepted with several metrics: tpe, random, gp, qmc, nsga2"),
         exp("tune:\n  search: optuna\n  metric: [val/average_accuracy, val/bwt]\n  optuna: {sampler: cmaes}\n")),
    Case("optuna seed negative", ["sweep", "{d}/exp.yaml"], ("tune.optuna.seed: got -1", "accepted: an integer in"),
         exp("tune:\n  search: optuna\n  optuna: {seed: -1}\n")),
    Case("optuna pruner unknown", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner: unknown pruner 'patient'",
          "accepted: none, median, percentile, successive_halving, hyperband"),
         exp("tune:\n  optuna: {pruner: patient}\n")),
    Case("pruner n_startup_trials negative", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner.n_startup_trials: got -1", "accepted: an integer >= 0"),
         exp("tune:\n  optuna: {pruner: {name: median, n_startup_trials: -1}}\n")),
    Case("pruner option of another pruner", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner.percentile: not an option of the median pruner (an option of percentile)",
          "accepted for median: n_startup_trials, n_warmup_steps, interval_steps, n_min_trials"),
         exp("tune:\n  optuna: {pruner: {name: median, percentile: 25}}\n")),
    Case("pruner options Optuna refuses together", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner: Optuna refuses these options", "bootstrap_count"),
         exp("tune:\n  optuna: {pruner: {name: successive_halving, bootstrap_count: 2}}\n")),
    Case("pruner with asha", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner: median and tune.scheduler: asha would both stop trials early",
          "accepted: one of them"), exp("tune:\n  scheduler: asha\n  optuna: {pruner: median}\n")),
    Case("pruner with two metrics", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner: median works on one metric, but tune.metric names 2",
          "accepted with several metrics: none"),
         exp("tune:\n  metric: [val/average_accuracy, val/forgetting]\n  optuna: {pruner: median}\n")),
    Case("pruner over streams of different lengths", ["sweep", "{d}/exp.yaml"],
         ("tune.optuna.pruner: the hyperband pruner compares trials stage by stage", "streams of 2 and 5 stages",
          "accepted: pruner none"),
         exp("sweep:\n  data.classes_per_stage: {grid: [2, 5]}\ntune:\n  optuna: {pruner: hyperband}\n")),
    Case("tracking key unknown", ["sweep", "{d}/exp.yaml"], ("tracking.log_modle: unknown key",),
         exp("tracking:\n  log_modle: false\n")),
    Case("tracking flag not a boolean", ["sweep", "{d}/exp.yaml"], ("tracking.log_model: got 'maybe'",
                                                                     "accepted: "),
         exp("tracking:\n  log_model: maybe\n")),
    Case("cpus_per_trial beyond the machine", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.cpus_per_trial: a trial needs 99 CPUs on one node, and the cluster has 2",
          "accepted: at most 2"), exp("tune:\n  resources: {cpus_per_trial: 99}\n"), ray=True),
    Case("workers beyond the machine", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.num_workers: a trial needs 8 CPUs in the cluster", "accepted: "),
         exp("tune:\n  resources: {num_workers: 8}\n"), ray=True),
    Case("use_gpu without GPUs", ["sweep", "{d}/exp.yaml"],
         ("tune.resources.use_gpu: a trial needs 1 GPUs", "accepted: use_gpu false or auto"),
         exp("tune:\n  resources: {num_workers: 1, use_gpu: true}\n"), ray=True, skip=NO_GPU),
    # --- data files --------------------------------------------------------------------------------------------
    Case("npz not found", ["run", "{d}/exp.yaml"], ("data.root: file", "bad.npz not found"), exp(base=NPZ_RUN)),
    Case("npz not a zip", ["sweep", "{d}/exp.yaml"], ("data.root", "bad.npz"),
         {**exp(base=NPZ_RUN), "bad.npz": "plain text"}),
    Case("npz without y_test", ["run", "{d}/exp.yaml"], ("bad.npz lacks array(s) y_test", "needed: x_train, y_train, x_test, y_test"),
         {**exp(base=NPZ_RUN), "bad.npz": lambda p: np.savez(p, x_train=np.zeros((4, 2)), y_train=np.arange(4),
                                                            x_test=np.zeros((4, 2)))}),
    Case("npz float label", ["run", "{d}/exp.yaml"], ("bad.npz: y_train[5] = 0.7 is not an integer class id",
                                                       "accepted: integer class ids"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(set_value("y_train", 5, 0.7))}),
    Case("npz NaN input", ["sweep", "{d}/exp.yaml"], ("bad.npz: x_test holds 1 NaN", "x_test[3]",
                                                       "accepted: finite numbers"),
         {**exp(SWEEP, base=NPZ_RUN), "bad.npz": npz(set_value("x_test", (3, 1), np.nan))}),
    Case("npz inf input", ["run", "{d}/exp.yaml"], ("bad.npz: x_train holds 0 NaN and 1 inf", "accepted: finite"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(set_value("x_train", (7, 0), np.inf))}),
    Case("npz label 1e9", ["cache", "{d}/exp.yaml"], ("bad.npz: y_train[2] = 1000000000 is not a plausible class id",
                                                       "accepted: class ids 0..1999"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(set_value("y_train", 2, 1e9))}),
    Case("npz negative label", ["sweep", "{d}/exp.yaml"], ("bad.npz: y_test[1] = -1 is negative", "accepted: "),
         {**exp(SWEEP, base=NPZ_RUN), "bad.npz": npz(lambda a: a["y_test"].__setitem__(1, -1))}),
    Case("npz one class", ["run", "{d}/exp.yaml"], ("bad.npz: y_train holds a single class",
                                                     "accepted: at least two classes"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(y_train=np.zeros(12, int), y_test=np.zeros(8, int))}),
    Case("npz class missing from test", ["sweep", "{d}/exp.yaml"], ("bad.npz: class 3", "none in y_test",
                                                                    "accepted: every class"),
         {**exp(SWEEP, base=NPZ_RUN), "bad.npz": npz(y_test=np.arange(8) % 3)}),
    Case("npz lengths differ", ["cache", "{d}/exp.yaml"], ("bad.npz: x_train has 12 rows but y_train has 11",
                                                            "accepted: one label per input"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(y_train=np.arange(11) % 4)}),
    Case("npz inputs of one dimension", ["sweep", "{d}/exp.yaml"], ("bad.npz: x_train has shape (12,)",
                                                                    "accepted: vectors (N, D) or images"),
         {**exp(SWEEP, base=NPZ_RUN), "bad.npz": npz(x_train=np.zeros(12))}),
    Case("npz one-hot labels", ["run", "{d}/exp.yaml"], ("bad.npz: y_train has shape (12, 4)",
                                                          "accepted: one integer class id per sample"),
         {**exp(base=NPZ_RUN), "bad.npz": npz(y_train=np.eye(4)[np.arange(12) % 4])}),
    Case("npz string labels", ["sweep", "{d}/exp.yaml"], ("bad.npz: y_train has dtype <U1", "accepted: integer"),
         {**exp(SWEEP, base=NPZ_RUN), "bad.npz": npz(y_train=np.array(list("abcdabcdabcd")))}),
    Case("npz of pickled objects", ["run", "{d}/exp.yaml"], ("data.root", "bad.npz"),
         {**exp(base=NPZ_RUN), "bad.npz": lambda p: np.savez(p, x_train=np.array([{"a": 1}] * 4, dtype=object),
                                                            y_train=np.arange(4), x_test=np.zeros((4, 2)),
                                                            y_test=np.arange(4))}),
    Case("key-init npz with NaN", ["sweep", "{d}/exp.yaml"], ("learner.key_init_data.root", "keys.npz",
                                                              "accepted: finite numbers"),
         {**exp(SWEEP, base=OK_BASE.replace("key_dim: 4}", "key_dim: 4, key_init_data: {source: npz, root: "
                                                            "{d}/keys.npz}}")),
          "keys.npz": npz(set_value("x_train", (0, 0), np.nan))}),
    Case("image folder of one class", ["sweep", "{d}/exp.yaml"], ("data.root", "accepted: at least two classes"),
         {**exp(SWEEP, base="  data: {source: image_folder, root: {d}/images}\n  learner: {name: linear}\n"),
          "images": image_folder({"cat": 3})}),
    Case("CIFAR folder missing", ["sweep", "{d}/exp.yaml"], ("data.root", "cifar-10-batches-py"),
         exp(SWEEP, base="  data: {source: cifar10, root: {d}/cifar, download: false}\n"
                         "  backbone: {name: small_cnn}\n  learner: {name: linear}\n")),
    Case("swept data set bad", ["sweep", "{d}/exp.yaml"], ("bad.npz: x_test holds 1 NaN",),
         {**exp("sweep:\n  data.root: {grid: [{d}/good.npz, {d}/bad.npz]}\n", base=NPZ_RUN.replace("bad", "good")),
          "good.npz": npz(), "bad.npz": npz(set_value("x_test", (3, 1), np.nan))}),
    # --- command-line flags ------------------------------------------------------------------------------------
    Case("--name with ..", ["sweep", "{d}/exp.yaml", "--name", "../x"], ("--name: '../x' is not a plain name",
                                                                         "accepted: letters, digits"), exp()),
    Case("--name with a slash", ["sweep", "{d}/exp.yaml", "--name", "a/b"], ("--name: 'a/b' is not a plain name",),
         exp()),
    Case("--storage a file", ["sweep", "{d}/exp.yaml", "--storage", "{d}/FILE"], ("--storage:", "is a file",
                                                                                   "give a folder"),
         {**exp(), "FILE": "not a folder"}),
    Case("--num-cpus zero", ["sweep", "{d}/exp.yaml", "--num-cpus", "0"], ("--num-cpus", "integer >= 1"), exp()),
    Case("--num-cpus not a number", ["resume", "x", "--num-cpus", "two"], ("--num-cpus", "integer >= 1"), {}),
    Case("--address closed port", ["sweep", "{d}/exp.yaml", "--address", "127.0.0.1:9"],
         ("--address: nothing answers at 127.0.0.1:9",), exp()),
    Case("--address without a port", ["sweep", "{d}/exp.yaml", "--address", "headnode"],
         ("--address: 'headnode' is not HOST:PORT", "accepted: HOST:PORT"), exp()),
    Case("--tracking-uri closed port", ["sweep", "{d}/exp.yaml", "--tracking-uri", "http://127.0.0.1:9"],
         ("--tracking-uri: no MLflow server answers at http://127.0.0.1:9", "or use sqlite:///mlflow.db"), exp()),
    Case("--tracking-uri database closed port", ["sweep", "{d}/exp.yaml", "--tracking-uri",
                                                 "postgresql+psycopg2://clorch@127.0.0.1:9/mlflow"],
         ("--tracking-uri: the database at postgresql+psycopg2://clorch@127.0.0.1:9/mlflow refuses a connection",
          "Connection refused", "PGPASSWORD or ~/.pgpass"), exp()),
    Case("--tracking-uri database driver missing", ["sweep", "{d}/exp.yaml", "--tracking-uri",
                                                    "mysql://clorch@127.0.0.1:9/mlflow"],
         ("--tracking-uri: mysql:// needs the Python package 'MySQLdb'", "e.g. postgresql+psycopg2://"), exp(),
         skip=None if importlib.util.find_spec("MySQLdb") is None else "MySQLdb is installed here"),
    Case("--tracking-uri with a password", ["sweep", "{d}/exp.yaml", "--tracking-uri",
                                            "postgresql+psycopg2://clorch:s3cret@127.0.0.1:9/mlflow"],
         ("--tracking-uri: postgresql+psycopg2://clorch:***@127.0.0.1:9/mlflow carries a password",
          "PGPASSWORD or ~/.pgpass"), exp()),
    Case("--tracking-uri in a missing folder", ["sweep", "{d}/exp.yaml", "--tracking-uri", "sqlite:///no/m.db"],
         ("--tracking-uri: folder", "no does not exist", "accepted: a store in an existing folder"), exp()),
    Case("--tracking-uri unknown scheme", ["sweep", "{d}/exp.yaml", "--tracking-uri", "ftp://host/x"],
         ("--tracking-uri: unknown scheme 'ftp'", "accepted: sqlite://"), exp()),
    Case("--name of a deleted MLflow experiment", ["sweep", "{d}/exp.yaml", "--name", "gone"],
         ("--name: sqlite:///", "holds a deleted MLflow experiment named gone", "accepted: another --name",
          "mlflow experiments restore --experiment-id"), {**exp(), "mlflow.db": deleted_experiment("gone")}),
    Case("--output in a missing folder", ["run", "{d}/exp.yaml", "--output", "{d}/no/such/out.json"],
         ("--output: folder", "does not exist"), exp()),
    Case("--extend without --name", ["sweep", "{d}/exp.yaml", "--extend"],
         ("--extend: needs --name, the existing sweep",), exp(SWEEP)),
    Case("--extend of an unknown sweep", ["sweep", "{d}/exp.yaml", "--name", "nope", "--extend"],
         ("--extend: nope: no sweep of that name", "sweeps there: s"),
         {**exp(SWEEP), "clorch_runs": existing_sweep()}),
    Case("--extend with another base", EXTEND,
         ("--extend: base.train.epochs is 2 in", "but 1 in sweep s", "accepted: the sweep's base config"),
         {**exp(SWEEP, base=OK_BASE.replace("epochs: 1", "epochs: 2")), "clorch_runs": existing_sweep()}),
    Case("--extend with other tune options", EXTEND,
         ("--extend: tune.max_failures is 1 in", "but 0 in sweep s", "accepted: the sweep's tune options"),
         {**exp("sweep:\n  seed: {grid: [0, 1, 2]}\ntune:\n  max_failures: 1\n"), "clorch_runs": existing_sweep()}),
    Case("--extend with other tracking options", EXTEND,
         ("--extend: tracking.codebooks is False in", "but True in sweep s", "accepted: the sweep's tracking options"),
         {**exp("sweep:\n  seed: {grid: [0, 1, 2]}\ntracking:\n  codebooks: false\n"),
          "clorch_runs": existing_sweep()}),
    Case("--extend without an axis of the sweep", EXTEND,
         ("--extend: sweep.seed is an axis of sweep s but not of", "accepted: every axis of the sweep (seed)"),
         {**exp("sweep:\n  train.lr: {grid: [0.1, 0.3]}\n"), "clorch_runs": existing_sweep()}),
    Case("--extend with an axis the sweep lacks", EXTEND,
         ("--extend: sweep.train.lr is not an axis of sweep s", "accepted: its own axes (seed)"),
         {**exp("sweep:\n  seed: {grid: [0, 1]}\n  train.lr: {grid: [0.1, 0.3]}\n"),
          "clorch_runs": existing_sweep()}),
    Case("--extend changing an axis's kind", EXTEND,
         ("--extend: sweep.seed is a choice axis here but a grid axis in sweep s", "accepted: grid"),
         {**exp("sweep:\n  seed: {choice: [0, 1, 2]}\n"), "clorch_runs": existing_sweep()}),
    Case("--extend over a sampled axis", EXTEND,
         ("--extend: sweep.train.lr is a uniform axis, whose points are drawn", "accepted: grid axes only"),
         {**exp("sweep:\n  train.lr: {uniform: [0.1, 1.0]}\n"),
          "clorch_runs": existing_sweep({"train.lr": {"uniform": [0.1, 1.0]}})}),
    Case("--extend with nothing new", EXTEND,
         ("--extend: nothing to add: all 2 points of", "already ran in sweep s", "accepted: more values"),
         {**exp(SWEEP), "clorch_runs": existing_sweep()}),
    Case("resume unknown sweep", ["resume", "nope"], ("nope: no sweep of that name", "sweeps there: none"), {}),
    Case("status unknown sweep", ["status", "nope"], ("nope: no sweep of that name",), {}),
    Case("report unknown sweep", ["report", "nope"], ("nope: no sweep of that name",), {}),
    Case("report mode unknown", ["report", "nope", "--mode", "best"], ("--mode", "invalid choice: 'best'"), {}),
    Case("ui port out of range", ["ui", "--port", "70000"], ("--port", "1..65535"), {}),
    Case("unknown command", ["train", "{d}/exp.yaml"], ("invalid choice: 'train'",), exp()),
]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.skipif(True, reason=c.skip)]
                                               if c.skip else []) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, monkeypatch, capsys, request):
    if case.ray:
        request.getfixturevalue("ray_local")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ./clorch_runs, ./mlflow.db and ./mlruns would appear here
    monkeypatch.setenv("CLORCH_CACHE_DIR", str(work / "cache"))
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    for name, content in case.files.items():
        if isinstance(content, str):
            (work / name).write_text(content.replace("{d}", str(work)))
        else:
            content(work / name)
    before = snapshot(work)
    capsys.readouterr()  # what making the files printed is not the command's
    argv = [a.replace("{d}", str(work)) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's mistakes
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("clorch: error: "), "\n".join(err)
    for fragment in case.says:
        assert fragment.replace("{d}", str(work)) in err[0], err[0]
    assert snapshot(work) == before  # no storage, no MLflow store, no cache file, no output



AS_A_USER_RUNS_IT = ["lr NaN", "npz NaN input", "stage class absent", "--address closed port",
                     "cpus_per_trial beyond the machine", "ui port out of range"]


@pytest.mark.slow
@pytest.mark.parametrize("name", AS_A_USER_RUNS_IT)
def test_the_console_script_prints_the_same_one_line(name, tmp_path):
    """A few cases through the real `clorch` process: its own logging set up, a Ray started when the case
    needs one. Progress goes to stdout; stderr holds the error line alone."""
    (case,) = [c for c in CASES if c.name == name]
    for file, content in case.files.items():
        if isinstance(content, str):
            (tmp_path / file).write_text(content.replace("{d}", str(tmp_path)))
        else:
            content(tmp_path / file)
    before = snapshot(tmp_path)
    argv = [a.replace("{d}", str(tmp_path)) for a in case.argv]
    if case.ray:
        argv += ["--num-cpus", "2"]
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("clorch: error: "), proc.stderr
    assert all(fragment.replace("{d}", str(tmp_path)) in err[0] for fragment in case.says), err[0]
    assert snapshot(tmp_path) == before
