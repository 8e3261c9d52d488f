"""`clorch report` over a tiny real sweep (Ray Tune + MLflow on SQLite), and cluster.yaml against Ray's schema."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import markdown_tables
from workloads.config import ConfigError

REPO = Path(__file__).resolve().parents[1]

SWEEP = """
base:
  name: report_test
  seed: 0
  cache_dir: {cache}
  data: {{source: digits, classes_per_stage: 5}}
  learner: {{name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}}
  train: {{epochs: 1}}
sweep:
  learner.num_keys: {{grid: [16, 32]}}
"""


@pytest.fixture(scope="module")
def finished_sweep(ray_local, tmp_path_factory):
    """A 2-trial sweep (num_keys 16 and 32) on digits in 2 stages, fitted to the end: (name, storage)."""
    from orchestrator.config import load_experiment
    from orchestrator.sweep import build_tuner, parse_tune

    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "sweep.yaml"
    path.write_text(SWEEP.format(cache=tmp / "cache"))
    experiment = load_experiment(path)
    storage = tmp / "runs"
    results = build_tuner(experiment, parse_tune({}), "tiny", storage, "sqlite:///" + str(tmp / "mlflow.db")).fit()
    assert not results.errors
    return "tiny", storage


@pytest.mark.slow
def test_report_ranks_trials_best_first_with_a_csv_row_and_a_plot_each(finished_sweep, tmp_path):
    from orchestrator.report import write_report

    name, storage = finished_sweep
    markdown = write_report(name, storage, tmp_path / "out")
    assert "selected on validation data (val/average_accuracy)" in markdown
    (ghead, groups), (head, rows) = markdown_tables(markdown)
    assert [r[ghead.index("n")] for r in groups] == ["1", "1"]  # no seed axis: each configuration once
    assert len(rows) == 2 and all(r[head.index("state")] == "done" and r[head.index("stages")] == "2/2"
                                  for r in rows)
    values = [float(r[head.index("val/average_accuracy")]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert [r[ghead.index("learner.num_keys")] for r in groups] == [r[head.index("learner.num_keys")] for r in rows]
    assert sorted(r[head.index("learner.num_keys")] for r in rows) == ["16", "32"]
    assert all(r[head.index("future_inputs")] == "no" for r in rows)

    with open(tmp_path / "out" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [r[head.index("trial")] for r in rows]
    assert sorted(int(r["learner.num_keys"]) for r in table) == [16, 32]
    for r in table:
        png = tmp_path / "out" / f"{r['trial']}.png"
        assert r["plot"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = ["accuracy_vs_forgetting.png", "seen_by_stage.png"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted([*comparison,
                                                                              *(r["plot"] for r in table)])
    with open(tmp_path / "out" / "leaderboard.csv") as f:
        configs = list(csv.DictReader(f))
    assert [c["n"] for c in configs] == ["1", "1"] and "val/average_accuracy mean" in configs[0]


@pytest.mark.slow
def test_the_report_compares_configurations_in_figures_and_on_one_self_contained_page(finished_sweep, tmp_path):
    import base64

    from orchestrator.report import write_report

    name, storage = finished_sweep
    markdown = write_report(name, storage, tmp_path / "out")
    out = tmp_path / "out"
    assert "seen_by_stage.png" in markdown and "report.html" in markdown
    for figure in ("seen_by_stage.png", "accuracy_vs_forgetting.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "<table>" in page and "dkvb K=16" in page and "dkvb K=32" in page  # trials by their swept values
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == 2 + 2  # the two comparison figures and one plot per trial, inlined
    assert all(base64.b64decode(i.split('"')[0])[:4] == b"\x89PNG" for i in images)
    assert "src=\"http" not in page and "<script" not in page  # nothing fetched when opened


@pytest.mark.slow
def test_mlflow_runs_are_named_by_their_swept_values_and_the_parent_compares_them(finished_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    name, storage = finished_sweep
    client = MlflowClient("sqlite:///" + str(storage.parent / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["dkvb K=16", "dkvb K=32"]
    # the trial id moved from the name to a tag
    assert sorted(r.data.tags["clorch.trial_id"].rpartition("_")[2] for r in children) == ["00000", "00001"]
    for child in children:  # the data each trained on, as MLflow dataset inputs
        (used,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert used.dataset.name == "digits" and len(used.dataset.digest) == 16
        assert [(t.key, t.value) for t in used.tags] == [("mlflow.data.context", "train")]
        assert json.loads(used.dataset.profile)["stream"]["classes_per_stage"] == 5
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert figures == {"comparison/seen_by_stage.png", "comparison/accuracy_vs_forgetting.png"}


@pytest.mark.slow
def test_report_orders_by_any_metric_in_its_own_direction_and_names_unknown_ones(finished_sweep, tmp_path,
                                                                                 monkeypatch):
    from orchestrator.report import write_report

    name, storage = finished_sweep
    monkeypatch.chdir(tmp_path)  # the default folder is ./clorch_report/NAME
    markdown = write_report(name, storage, metric="test/forgetting")  # no mode: forgetting's own, min
    assert "by test/forgetting (min)" in markdown and "selected on TEST data (test/forgetting, asked for" in markdown
    _, (head, rows) = markdown_tables(markdown)
    values = [float(r[head.index("test/forgetting")]) for r in rows]
    assert values == sorted(values)
    assert (tmp_path / "clorch_report" / name / "leaderboard.csv").exists()  # the default out_dir, a visible one
    with pytest.raises(ConfigError, match="no_such_metric.*val/average_accuracy"):
        write_report(name, storage, metric="no_such_metric")
    with pytest.raises(ConfigError, match="no sweep of that name.*tiny"):
        write_report("other", storage)


@pytest.mark.parametrize("damaged", ["tuner.pkl", "experiment_state", "sweep.json"])
def test_unreadable_sweep_state_is_one_line_and_left_as_it_was(finished_sweep, tmp_path, capsys, damaged,
                                                                monkeypatch):
    """Tune's own state (or clorch's record of the sweep) truncated: status, report and resume each say so in one
    line with exit status 2, and change nothing on disk."""
    import shutil

    from orchestrator.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # resume: the store the sweep was started with
    name, storage = finished_sweep
    copy = tmp_path / "runs"
    shutil.copytree(storage, copy)
    path = {"tuner.pkl": copy / name / "tuner.pkl", "sweep.json": copy / ".clorch" / name / "sweep.json",
            "experiment_state": next((copy / name).glob("experiment_state-*.json"))}[damaged]
    path.write_bytes(path.read_bytes()[:100])
    def files():  # the sweep's state; driver.lock, which a resume takes before it reads that state, holds none
        return {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != "driver.lock"}

    before = files()
    capsys.readouterr()
    commands = [["status", name], ["resume", name]]
    if damaged != "tuner.pkl":  # the report reads the trials' results, not the pickled Tuner
        commands.append(["report", name])
    for command in commands:
        assert main([*command, "--storage", str(copy)]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"clorch: error: {name}: ") and "cannot be read" in err[0], err
    assert files() == before


def test_a_second_driver_on_a_sweep_is_refused(finished_sweep, tmp_path, capsys):
    """`clorch resume` while another process drives the sweep: one line naming that driver, nothing started."""
    import shutil
    import subprocess
    import sys

    name, storage = finished_sweep
    copy = tmp_path / "runs"
    shutil.copytree(storage, copy)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from orchestrator.sweep import hold_driver_lock; "
                               f"hold_driver_lock(Path({str(copy)!r}), {name!r}); print('held', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from orchestrator.cli import main

        capsys.readouterr()
        assert main(["resume", name, "--storage", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"another clorch driver (pid {holder.pid} on " in err[0], err
    finally:
        holder.kill()
        holder.wait()


def test_cluster_yaml_is_a_valid_ray_launcher_config():
    import jsonschema
    import ray

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "g4dn.", "p3.", "p4d.")) for t in workers)

    # What `ray up` itself checks once the provider's defaults are filled in.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))

    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(k) or []]
    for command in commands:  # every command is valid bash
        subprocess.run(["bash", "-n", "-c", command], check=True, env={"PATH": os.environ["PATH"]})
    setup = " ".join(config["setup_commands"])
    assert "pip install -e" in setup and "clorch" in setup
    mlflow = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow and "--host 127.0.0.1" in mlflow[0] and "--backend-store-uri postgresql+psycopg2://" in mlflow[0]
    assert "--app-name basic-auth" in mlflow[0]  # more on the head's MLflow in tests/test_cluster_config.py
    # token authentication on every node: the token copied there, private, and every `ray start` in token mode
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in setup and "export RAY_AUTH_MODE=token" in setup
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[k]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


DOMAINS = """
base:
  data: {source: digits, stream: domain_incremental, num_domains: 3, shift: {name: rotation, step: 30}}
  learner: {name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}
  train: {epochs: 1, batch_size: 64}
sweep:
  seed: {grid: [0]}
"""


@pytest.mark.slow
def test_a_domain_streams_matrix_is_labelled_by_domain_in_mlflow_and_the_report(ray_local, tmp_path):
    from orchestrator.cli import main
    from orchestrator.report import load_trials
    from test_sweep import runs_of, sweep_args

    path = tmp_path / "domains.yaml"
    path.write_text(DOMAINS)
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "dom", *args]) == 0
    _, _, (child,) = runs_of(uri, "dom")
    assert child.data.tags["protocol.axis"] == "domain"
    (trial,), _ = load_trials("dom", tmp_path / "runs")
    assert trial.axis == "domain" and len(trial.matrix) == 3
