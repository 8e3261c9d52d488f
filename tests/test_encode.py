"""Encoding as Ray tasks (orchestrator/encode.py): every embeddings file a sweep's trials read is encoded once,
spread over the nodes, before any trial starts; the trials then only read the cache."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_experiment

# 2 seeds (small_cnn's random weights follow the seed) x 2 learners that read the same embeddings x 2 learning
# rates (no cache of their own): 8 trials, 4 distinct files (2 backbones x train, test)
EXPERIMENT = """
base:
  data: {source: digits, classes_per_stage: 5}
  backbone: {name: small_cnn}
  learner: {name: linear}
  train: {epochs: 1, batch_size: 64}
sweep:
  seed: {grid: [0, 1]}
  learner.name: {grid: [linear, mlp]}
  train.lr: {grid: [0.1, 0.3]}
"""
LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+), key ([0-9a-f]{8}): (\d+) inputs encoded in .* on node ([0-9a-f]+) ",
                  re.MULTILINE)


def _tasks(out: str) -> list[dict]:
    return [{"what": m[3], "key": m[4], "inputs": int(m[5]), "node": m[6]} for m in LINE.finditer(out)]


@pytest.mark.slow
def test_cache_on_a_two_node_cluster_encodes_each_file_once_on_both_nodes_and_trials_encode_nothing(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT)
    cache = tmp_path / "shared-cache"  # every simulated node is this machine: one folder they all see
    env = {**os.environ, "CLORCH_CACHE_DIR": str(cache), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "two_node_encode.py"), str(path)],
                          capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    code, out = report["first"]
    assert code == 0, out
    tasks = _tasks(out)
    files = {name.removesuffix(".arrow")[:8] for name in report["after_tasks"]}
    assert len(tasks) == 4 and len(files) == 4  # 2 backbones x (train, test), not one per trial or per config
    assert sorted(t["key"] for t in tasks) == sorted(files)  # each file encoded by exactly one task
    assert sorted(t["inputs"] for t in tasks) == [540, 540, 1257, 1257]  # digits' test and train splits
    names = {report["nodes"][n] for t in tasks for n in report["nodes"] if n.startswith(t["node"])}
    assert names == {"head", "worker"}  # spread over both nodes
    code, out = report["again"]
    assert code == 0 and not _tasks(out) and "all 4 file(s) the trials read are cached already" in out
    code, out = report["local"]  # without --address: in this process, as before, reading the tasks' files
    assert code == 0 and out.count("embeddings already cached") == 4
    assert report["trials_encoded"] == [0, 0, 0, 0]
    assert report["after_trials"] == report["after_tasks"]  # no file rewritten


@pytest.mark.slow
def test_a_local_sweep_encodes_before_its_trials_and_they_read_the_cache(ray_local, tmp_path, capsys):
    cache = tmp_path / "cache"
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("learner.name: {grid: [linear, mlp]}\n  train.lr: {grid: [0.1, 0.3]}\n", "")
                    .replace("base:\n", f"base:\n  cache_dir: {cache}\n"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(path), "--name", "enc", "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "embeddings: encoding 4 file(s) in this process (a local Ray without GPUs)" in out
    tasks = _tasks(out)
    assert len(tasks) == 4 and out.count("DONE") == 2  # 2 trials, after the 4 files
    assert out.index("embeddings: encoding") < out.index("DONE")
    # a trial that missed a file would have written one the tasks did not: the cache holds the tasks' files only
    assert sorted(p.name[:8] for p in (cache / "features").glob("*.arrow")) == sorted(t["key"] for t in tasks)


def test_tasks_fill_the_files_a_trial_reads_and_skip_what_is_cached(ray_local, tmp_path, capsys):
    from orchestrator.encode import encode_configs, plan
    from workloads.runner import prepare

    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("base:\n", f"base:\n  cache_dir: {tmp_path / 'cache'}\n"))
    configs, _ = load_experiment(path, []).cache_configs()
    assert len(configs) == 4 and len(plan(configs).todo) == 4  # 4 configs share 4 files, not 8
    lines: list[str] = []
    reports = encode_configs(configs, lines.append)
    assert len(reports) == 4 and all(r["inputs"] for r in reports)
    assert all(prepare(c).context.features.encoded == 0 for c in configs)  # a trial's store encodes nothing
    again: list[str] = []
    assert encode_configs(configs, again.append) == [] and "cached already" in again[0]


def test_domain_stream_slices_are_encoded_as_tasks_and_read_by_the_run(ray_local, tmp_path):
    from orchestrator.encode import encode_configs
    from workloads.config import parse_run_config
    from workloads.runner import prepare

    config = parse_run_config({"cache_dir": str(tmp_path / "cache"), "backbone": {"name": "small_cnn"},
                               "learner": {"name": "linear"},
                               "data": {"source": "digits", "stream": "domain_incremental", "num_domains": 3,
                                        "shift": {"name": "rotation", "step": 30}}})
    reports = encode_configs([config], lambda line: None)
    assert len(reports) == 6  # each domain's train slice and its shifted test set
    assert len({r["key"] for r in reports}) == 6
    assert prepare(config).context.features.encoded == 0


def test_cache_with_an_address_where_nothing_answers_is_one_line(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("base:\n", f"base:\n  cache_dir: {tmp_path / 'cache'}\n"))
    assert main(["cache", str(path), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clorch: error: --address: nothing answers at 127.0.0.1:1")
    assert not (tmp_path / "cache").exists()  # nothing encoded, in this process or elsewhere
