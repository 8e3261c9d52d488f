"""Sweeps on a real local Ray with a real MLflow store: tracking, failure, resume."""
import json
import logging
import re
from pathlib import Path

import mlflow
import torch
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.config import load_experiment
from orchestrator.models import load_model
from workloads.runner import run_stream

QUICKSTART = str(Path(__file__).parent.parent / "search_spaces" / "quickstart.yaml")


def runs_of(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def logged_models(child):
    """The MLflow logged models of a child run (the tracking URI must be set)."""
    return mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list",
                                       filter_string=f"source_run_id = '{child.info.run_id}'")


def sweep_args(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [*extra, "--storage", str(tmp_path / "runs"), "--tracking-uri", uri]


@pytest.mark.slow
def test_quickstart_sweep_tracks_one_parent_and_a_child_per_trial(ray_local, tmp_path, capsys, monkeypatch):
    """The README's quickstart commands verbatim, in a fresh working folder: the sweep on its defaults
    (./clorch_runs, sqlite:///mlflow.db), then `clorch status` and `clorch report` (tests/test_quoted_commands.py)."""
    (tmp_path / "search_spaces").symlink_to(Path(QUICKSTART).parent)
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    assert main(["sweep", "search_spaces/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("DONE") == 4
    # the console: clorch's line per trial per stage, Tune's tables, and at most a handful of other lines
    running = out[:out.index("\n#  trial")].splitlines()
    stages = [line for line in running if re.match(r"\[clorch\] \w+ dkvb K=(128|256) seed=[01]: stage [1-5]/5, "
                                                     r"val/average_accuracy [0-9.]+, test [0-9.]+, [0-9.]+s$", line)]
    assert len(stages) == 4 * 5
    tune_table = "╭│├╰+|"  # Tune's tables (in ASCII where the output is no terminal)
    others = [line for line in running if line.strip() and line not in stages and line[0] not in tune_table
              and not line.startswith(("[clorch]", "sweep quickstart:"))]
    assert len(others) <= 3, others
    client, parents, children = runs_of(uri, "quickstart")
    assert len(parents) == 1 and len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for split in ("val", "test"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, f"{split}/accuracy_on_seen_classes")]
            assert sorted(steps) == [1, 2, 3, 4, 5]  # stages by number, as in the console
            # a stage's own accuracy is logged from the stage that first trains it: no jump from 0 in the charts
            for j in range(1, 6):
                history = client.get_metric_history(child.info.run_id, f"{split}/accuracy_stage_{j}")
                assert sorted(m.step for m in history) == list(range(j, 6))
        assert child.data.tags["protocol.future_inputs"] == "false" and child.data.tags["protocol.validation"] == "0.1"
        assert child.data.params["learner.num_keys"] in ("128", "256")
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"accuracy_matrix.json", "accuracy_matrix_val.png", "accuracy_matrix_test.png", "codebooks"} <= artifacts
        codebooks = {a.path for a in client.list_artifacts(child.info.run_id, "codebooks")}
        assert {"codebooks/keys.npy", "codebooks/stage_5.npz", "codebooks/usage_stage_5.png"} <= codebooks
        models = logged_models(child)
        assert [m.name for m in models] == ["model"]
        assert child.data.metrics["test/average_accuracy"] > 0.75
    final = load_model(models[0].model_uri)  # the last trial's learner, as it ended, from safetensors + JSON
    assert final.bottleneck.values.abs().sum() > 0 and final.bottleneck.num_keys in (128, 256)
    assert parents[0].data.tags["protocol.selection"] == "validation"
    assert parents[0].data.tags["protocol.selection_metric"] == "val/average_accuracy"
    assert main(["status", "quickstart"]) == 0
    status = capsys.readouterr().out
    assert status.count("DONE") == 4
    assert sorted(re.findall(r"seed=[01]: stage 5/5", status)) == ["seed=0: stage 5/5"] * 2 + ["seed=1: stage 5/5"] * 2
    assert main(["report", "quickstart"]) == 0
    folder = tmp_path / "clorch_report" / "quickstart"
    assert f"report written to {folder}/" in capsys.readouterr().out
    assert (folder / "report.html").stat().st_size > 0


FAILING = """
base:
  data: {source: digits, classes_per_stage: 2}
  learner: {name: dkvb, num_codebooks: 16, num_keys: 64, key_dim: 8}
  train: {epochs: 3, batch_size: 64, lr: 0.3}
sweep:
  seed: {grid: [0, 1]}
tune:
  fail_at_stage: 2
"""


@pytest.mark.slow
def test_a_trial_failing_at_stage_2_resumes_from_stage_2_to_the_uninterrupted_result(ray_local, tmp_path, capsys):
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING)
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "f", *args]) == 1
    assert capsys.readouterr().out.count("ERROR") >= 2
    client, _, children = runs_of(uri, "f")
    assert len(children) == 2 and all(c.info.status == "FAILED" for c in children)
    assert all("error.txt" in {a.path for a in client.list_artifacts(c.info.run_id)} for c in children)

    assert main(["resume", "f", *args]) == 0
    client, parents, children = runs_of(uri, "f")
    assert len(parents) == 1 and len(children) == 2  # the same child runs, re-attached
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # stages 1 and 2 were not trained again
        seed = int(child.data.params["seed"])
        matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json")).read_text())
        config = load_experiment(path, [f"seed={seed}"]).base
        assert matrix["test"] == run_stream(config).test.accuracy_matrix


@pytest.mark.slow
def test_restart_errored_runs_errored_trials_from_stage_1_in_new_child_runs(ray_local, tmp_path, capsys):
    """`clorch resume --restart-errored`: each errored trial starts again from scratch under a new trial id and
    a new child run of the same parent, logs every stage once and ends as a clean run; the old run keeps its
    stages, ends FAILED and names the run that superseded it."""
    path = tmp_path / "restart.yaml"
    path.write_text(FAILING.replace("epochs: 3", "epochs: 1") + "  max_failures: 0\n")
    uri, args = sweep_args(tmp_path)
    storage = tmp_path / "runs"
    assert main(["sweep", str(path), "--name", "rs", *args]) == 1
    _, _, failed = runs_of(uri, "rs")
    before = _progress_rows(storage, "rs")
    assert sorted(before.values()) == [[0, 1], [0, 1]]
    capsys.readouterr()

    assert main(["resume", "rs", "--restart-errored", *args]) == 0
    client, parents, children = runs_of(uri, "rs")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    by_id = {c.info.run_id: c for c in children}
    new_runs = set()
    for old in failed:
        old = by_id[old.info.run_id]
        new = by_id[old.data.tags["clorch.superseded_by"]]
        new_runs.add(new.info.run_id)
        assert old.info.status == "FAILED" and new.info.status == "FINISHED"
        assert new.data.tags["clorch.restart_of"] == old.info.run_id
        assert new.data.tags["clorch.trial_id"] != old.data.tags["clorch.trial_id"]
        assert new.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        steps = lambda run: sorted(m.step for m in client.get_metric_history(run.info.run_id,  # noqa: E731
                                                                              "test/accuracy_on_seen_classes"))
        assert steps(old) == [1, 2] and steps(new) == [1, 2, 3, 4, 5]  # the old run keeps its data
        matrix = json.loads(Path(client.download_artifacts(new.info.run_id, "accuracy_matrix.json")).read_text())
        config = load_experiment(path, [f"seed={new.data.params['seed']}"]).base
        assert matrix["test"] == run_stream(config).test.accuracy_matrix
    mlflow.set_tracking_uri(uri)
    assert all(len(logged_models(by_id[run])) == 1 for run in new_runs)
    after = _progress_rows(storage, "rs")
    assert {k: v for k, v in after.items() if k in before} == before  # the old trials' result logs are kept
    assert sorted(v for k, v in after.items() if k not in before) == [[0, 1, 2, 3, 4]] * 2  # from stage 0
    runs = json.loads((storage / ".clorch" / "rs" / "mlflow_runs.json").read_text())
    assert set(runs["trials"].values()) == new_runs  # the map hands back the new runs only

    capsys.readouterr()
    assert main(["status", "rs", *args]) == 0
    assert capsys.readouterr().out.count("DONE") == 2
    assert main(["resume", "rs", "--restart-errored", *args]) == 0  # nothing errored: a plain resume
    assert "--restart-errored: no trial of rs errored; resuming it as without the flag" in capsys.readouterr().out
    assert _progress_rows(storage, "rs") == after and len(runs_of(uri, "rs")[2]) == 4


GROWING = """
base:
  data: {source: digits, classes_per_stage: 2}
  learner: {name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}
  train: {epochs: 1}
sweep:
  seed: {grid: [0, 1]}
tune:
  fail_at_stage: 2
"""


@pytest.mark.slow
def test_extend_runs_only_the_new_points_under_the_same_parent_and_every_command_sees_all(ray_local, tmp_path,
                                                                                          capsys):
    """A 2-seed sweep, then `--extend` with 3 seeds: refused while trials are errored; after a resume, only the
    third seed runs, as a Tune experiment of its own whose errored trial `clorch resume` continues; one parent
    run with 3 children, and the table, status, report and the parent's leaderboard see all 3 trials."""
    from conftest import markdown_tables

    path, more = tmp_path / "two.yaml", tmp_path / "three.yaml"
    path.write_text(GROWING)
    more.write_text(GROWING.replace("[0, 1]", "[0, 1, 2]"))
    uri, args = sweep_args(tmp_path)
    storage = tmp_path / "runs"
    extend = ["sweep", str(more), "--name", "g", "--extend", *args]
    assert main(["sweep", str(path), "--name", "g", *args]) == 1  # both trials fail once, before stage 2
    record = (storage / ".clorch" / "g" / "sweep.json").read_text()
    capsys.readouterr()
    assert main(extend) == 2
    assert "sweep g has 2 errored and 0 unfinished trial(s); `clorch resume g` first" in capsys.readouterr().err
    assert main(["resume", "g", *args]) == 0
    assert main([*extend, "--dry-run"]) == 0
    assert "extending g: 1 new point(s) beside the 2 it ran, 1 trial(s)" in capsys.readouterr().out
    assert not (storage / "g+1").exists() and (storage / ".clorch" / "g" / "sweep.json").read_text() == record
    first = _progress_rows(storage, "g")

    assert main(extend) == 1  # the new trial fails once too...
    assert _progress_rows(storage, "g+1") and _progress_rows(storage, "g") == first  # ...in a part of its own
    capsys.readouterr()
    assert main(["resume", "g", *args]) == 0  # ...and the resume continues that part alone
    out = capsys.readouterr().out
    assert out.count("DONE") == 3 and _progress_rows(storage, "g") == first
    (configuration,) = [line.split() for line in out.splitlines()[out.splitlines().index(next(
        line for line in out.splitlines() if line.startswith("configurations"))) + 2:] if line.strip()]
    assert configuration[:2] == ["1", "3"]  # one configuration, n = 3
    client, parents, children = runs_of(uri, "g")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert parents[0].data.metrics["best/n"] == 3
    board = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "leaderboard.json")).read_text())
    assert [row[board["columns"].index("n")] for row in board["data"]] == [3]  # replaced, not appended to
    assert main(["status", "g", *args]) == 0
    assert capsys.readouterr().out.count("DONE") == 3
    assert main(["report", "g", "--storage", str(storage), "--out", str(tmp_path / "report")]) == 0
    (ghead, groups), (head, rows) = markdown_tables(capsys.readouterr().out)
    assert [g[ghead.index("n")] for g in groups] == ["3"] and len(rows) == 3
    assert main(extend) == 2
    assert "--extend: nothing to add: all 3 points of" in capsys.readouterr().err


def test_resume_of_an_unknown_sweep_lists_the_known_ones(tmp_path, capsys):
    (tmp_path / "runs" / ".clorch" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / ".clorch" / "mine" / "sweep.json").write_text("{}")
    assert main(["resume", "nope", "--storage", str(tmp_path / "runs")]) == 2
    assert "nope: no sweep of that name" in capsys.readouterr().err


SLOW_SWEEP = """
base:
  data: {source: digits, classes_per_stage: 2}
  learner: {name: dkvb, num_codebooks: 16, num_keys: 64, key_dim: 8}
  train: {epochs: 40, batch_size: 32, lr: 0.3}
sweep:
  seed: {grid: [0, 1, 2, 3]}
tune:
  max_concurrent_trials: 2
"""


def _progress_rows(storage: Path, name: str) -> dict[str, list[int]]:
    """Stages each trial reported, from Tune's own per-trial result log (a re-run stage would repeat)."""
    rows = {}
    for result in (storage / name).glob("*/result.json"):
        stages = [json.loads(line)["stage"] for line in result.read_text().splitlines() if line.strip()]
        rows[result.parent.name] = stages
    return rows


@pytest.mark.slow
def test_a_killed_sweep_driver_resumes_and_every_trial_completes_once(ray_local, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "slow.yaml"
    path.write_text(SLOW_SWEEP)
    uri, args = sweep_args(tmp_path)
    address = ray_local.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--name", "k",
                               "--address", address, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a trial has finished and the next ones are under way
        rows = _progress_rows(tmp_path / "runs", "k")
        if any(len(stages) == 5 for stages in rows.values()) and len(rows) >= 3:
            break
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = _progress_rows(tmp_path / "runs", "k")
    finished_before = {trial for trial, stages in before.items() if len(stages) == 5}
    assert finished_before and len(finished_before) < 4

    assert main(["resume", "k", "--address", address, *args]) == 0
    after = _progress_rows(tmp_path / "runs", "k")
    assert len(after) == 4
    for trial, stages in after.items():
        # every trial completes exactly once; one killed mid-stage may repeat only the stage it was in
        assert sorted(set(stages)) == [0, 1, 2, 3, 4] and stages.count(4) == 1, (trial, stages)
        assert len(stages) <= 6, (trial, stages)
    for trial in finished_before:
        assert after[trial] == before[trial] == [0, 1, 2, 3, 4]  # finished trials never ran again
    client, parents, children = runs_of(uri, "k")
    assert len(parents) == 1 and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")]
        assert sorted(steps) == [1, 2, 3, 4, 5]


TWO_TRIALS = """
base:
  data: {source: digits, classes_per_stage: 5}
  learner: {name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}
  train: {epochs: 20, batch_size: 32}
sweep:
  seed: {grid: [0, 1]}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_cluster_runs_trials_on_both_nodes_and_logs_to_an_mlflow_server(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up"
                time.sleep(1)
        path = tmp_path / "two.yaml"
        path.write_text(TWO_TRIALS)
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "two_node_sweep.py"), str(path),
                               str(tmp_path / "runs"), uri], capture_output=True, text=True, timeout=300)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["exit"] == 0, proc.stderr[-3000:]
        nodes = [n for trial in report["nodes"].values() for n in trial]
        assert len(report["nodes"]) == 2 and len(set(nodes)) == 2  # one trial on each node
        _, parents, children = runs_of(uri, "two")
        assert len(parents) == 1 and len(children) == 2
        assert all(c.info.status == "FINISHED" for c in children)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_report_command_prints_the_leaderboard_and_models_are_registered(ray_local, tmp_path, capsys,
                                                                          monkeypatch):
    path = tmp_path / "two.yaml"
    path.write_text(TWO_TRIALS.replace("epochs: 20", "epochs: 1") + "tracking:\n  register_model: clorch-digits\n")
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "r", *args]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the report goes to ./clorch_report/NAME
    assert main(["report", "r", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.count("| done") == 2 and "val/average_accuracy" in out and "test/average_accuracy" in out
    folder = tmp_path / "clorch_report" / "r"
    assert f"report written to {folder}/" in out
    for name in ("leaderboard.csv", "trials.csv", "report.html", "seen_by_stage.png", "accuracy_vs_forgetting.png"):
        assert (folder / name).stat().st_size > 0, name
    versions = MlflowClient(uri).search_model_versions("name = 'clorch-digits'")
    assert len(versions) == 2  # one per trial
    mlflow.set_tracking_uri(uri)
    assert load_model("models:/clorch-digits/1").bottleneck.num_keys == 32


@pytest.mark.slow
def test_a_trial_on_a_ray_train_worker_resumes_from_its_train_checkpoint(ray_local, tmp_path, capsys):
    path = tmp_path / "worker.yaml"
    path.write_text(TWO_TRIALS.replace("epochs: 20", "epochs: 2").replace("[0, 1]", "[0]")
                    + "tune:\n  fail_at_stage: 1\n  resources: {num_workers: 1}\n")
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "w", *args]) == 1
    assert main(["resume", "w", *args]) == 0
    client, _, (child,) = runs_of(uri, "w")
    assert child.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")
    assert sorted(m.step for m in history) == [1, 2]
    matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json")).read_text())
    assert matrix["test"] == run_stream(load_experiment(path).base).test.accuracy_matrix
    assert (tmp_path / "runs" / ".clorch" / "w" / "train").is_dir()  # the Train run kept its checkpoints there
    # codebooks and the final model come from the Train run's checkpoints (Tune holds none for such trials)
    codebooks = {a.path for a in client.list_artifacts(child.info.run_id, "codebooks")}
    assert {"codebooks/stage_1.npz", "codebooks/stage_2.npz"} <= codebooks  # by stage number, from 1
    mlflow.set_tracking_uri(uri)
    assert logged_models(child)


@pytest.mark.slow
def test_two_train_workers_split_every_batch_and_replay_and_match_one_process(ray_local, tmp_path):
    path = tmp_path / "ddp.yaml"
    path.write_text("""
base:
  data: {source: digits, classes_per_stage: 5}
  learner: {name: mlp, hidden: 32}
  rehearsal: {memory_size: 100, selection: reservoir}
  train: {epochs: 3, batch_size: 64, optimizer: adam, lr: 0.01}
tune:
  resources: {num_workers: 2, cpus_per_worker: 0.9}
""")
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "ddp", *args]) == 0
    client, _, (child,) = runs_of(uri, "ddp")
    (result,) = (tmp_path / "runs" / "ddp").glob("*/result.json")
    assert {json.loads(line)["data_parallel_workers"] for line in result.read_text().splitlines()} == {2}
    matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json")).read_text())
    single = run_stream(load_experiment(path).base).test.accuracy_matrix
    # the same steps as one process, replay included (one memory, the same draws), up to the order of float sums
    assert all(abs(a - b) <= 0.01 for row, ref in zip(matrix["test"], single) for a, b in zip(row, ref))


@pytest.mark.slow
def test_dytox_trains_under_two_ray_train_workers_with_one_global_memory(ray_local, tmp_path):
    path = tmp_path / "dytox.yaml"
    path.write_text("""
base:
  preset: dytox_tiny
  learner: {name: dytox, depth: 1, finetune_epochs: 1}
  rehearsal: {memory_size: 60, selection: herding}
  train: {epochs: 2}
tune:
  resources: {num_workers: 2, cpus_per_worker: 0.9}
""")
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "dytox", *args]) == 0
    (result,) = (tmp_path / "runs" / "dytox").glob("*/result.json")
    reports = [json.loads(line) for line in result.read_text().splitlines()]
    assert {r["data_parallel_workers"] for r in reports} == {2}
    # one budget of 60 for both workers (quotas 30, 15, 10, 7, 6 per class), not 60 each; every worker checked
    # after each stage that it holds the same memory as the other, or the trial would have failed
    assert [r["memory_size"] for r in reports] == [60, 60, 60, 56, 60]
    checkpoints = (tmp_path / "runs" / ".clorch" / "dytox" / "train").glob("train-*/checkpoint_*/state.pt")
    final = max((torch.load(p, weights_only=True) for p in checkpoints), key=lambda s: s["next_stage"])
    memory = final["learner"]["memory"]
    assert len(memory["y"]) == 60 and torch.bincount(memory["y"]).tolist() == [6] * 10
    client, _, (child,) = runs_of(uri, "dytox")
    assert child.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(child.info.run_id, "memory_size")] == [60, 60, 60, 56, 60]
    assert len(final["learner"]["stage_classes"]) == 5
    mlflow.set_tracking_uri(uri)
    (model,) = logged_models(child)
    learner = load_model(model.model_uri)
    assert len(learner.task_tokens) == 5 and learner.memory is None  # the model, without its training data


def flip_inside_largest_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's bytes of a torch.save file (a zip of raw tensors):
    the file still loads, with one wrong number, which only a digest notices."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # still a readable checkpoint: the corruption would pass unseen


VERIFY = TWO_TRIALS.replace("epochs: 20", "epochs: 2").replace("classes_per_stage: 5", "classes_per_stage: 2") \
    .replace("[0, 1]", "[0]") + "tune:\n  fail_at_stage: 3\n"


def forget_stage(uri: str, run_id: str, state_dir: Path, trial_id: str, step: int) -> None:
    """What a driver killed before it processed a stage's report leaves: that stage's metrics were never
    written to the SQLite store at `uri`, and the run map records the tracking as one stage behind."""
    import sqlite3

    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        assert db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = ?", (run_id, step)).rowcount > 0
    runs = json.loads((state_dir / "mlflow_runs.json").read_text())
    runs["stages_logged"][trial_id] = step - 2  # Tune's stage index of the stage before
    (state_dir / "mlflow_runs.json").write_text(json.dumps(runs))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped", "deleted", "unreported"])
def test_a_damaged_stage_checkpoint_is_never_used_and_the_result_equals_a_clean_run(ray_local, tmp_path, damage,
                                                                                      capsys, caplog):
    from orchestrator import checkpoints

    path = tmp_path / "verify.yaml"
    path.write_text(VERIFY)
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "v", *args]) == 1  # fails once, after stage 3
    (latest,) = (tmp_path / "runs" / "v").glob("*/checkpoint_*")  # Ray's: the state after stage 3
    (copies,) = (tmp_path / "runs" / ".clorch" / "v" / "stages").iterdir()
    assert sorted(p.name for p in copies.iterdir()) == ["stage_00001", "stage_00002"]  # clorch keeps two
    if damage == "flipped":  # Ray's checkpoint and clorch's copy of stage 3: the newest good one is stage 2's
        for folder in (latest, copies / "stage_00002"):
            flip_inside_largest_tensor(folder / checkpoints.STATE_FILE)
            with pytest.raises(checkpoints.CheckpointInvalid, match="does not match its digest"):
                checkpoints.read(folder)
        # stage 2's report again, from clorch's copy (Tune may never have had it), then stage 3 trained again
        expected = [0, 1, 2, 1, 2, 3, 4]
    elif damage == "unreported":  # a driver killed before it processed stage 3's report: Ray's checkpoint of it
        import shutil  #            never registered (gone, here), MLflow never had stage 3, clorch's copy did

        shutil.rmtree(latest)
        _, _, (child,) = runs_of(uri, "v")
        first = MlflowClient(uri).get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")
        forget_stage(uri, child.info.run_id, copies.parent.parent, copies.name, 3)
        expected = [0, 1, 2, 2, 3, 4]  # stage 3's report again, from clorch's copy, then stages 4 and 5
    else:  # every checkpoint gone: the trial starts again from stage 1
        import shutil

        shutil.rmtree(latest)
        shutil.rmtree(copies)
        expected = [0, 1, 2, 0, 1, 2, 3, 4]
    capsys.readouterr()
    assert main(["status", "v", *args]) == 0  # says, before any resume, where each trial would continue
    out = capsys.readouterr().out
    if damage == "flipped":
        assert "a resume continues after stage 2 (skipped: checkpoint_000002: state.pt does not match" in out
    elif damage == "unreported":
        assert "a resume continues after stage 3 (skipped: checkpoint_000002: state.pt is missing)" in out
    else:
        assert "cannot be continued, no stage checkpoint verifies" in out and "starts it again from stage 1" in out
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        assert main(["resume", "v", *args]) == 0
    (result,) = (tmp_path / "runs" / "v").glob("*/result.json")
    assert [json.loads(line)["stage"] for line in result.read_text().splitlines()] == expected
    client, _, (child,) = runs_of(uri, "v")
    assert child.info.status == "FINISHED"
    # the trial's warning, logged in its Ray worker, reaches the user's console and the trial's MLflow run
    said = {"flipped": "continuing after stage 2", "unreported": "continuing after stage 3"}.get(
        damage, "starting again from stage 1")
    (shown,) = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert shown.startswith(f"trial {child.data.tags['clorch.trial_id']}, stage ")
    (logged,) = client.list_artifacts(child.info.run_id, "warnings")
    assert said in Path(client.download_artifacts(child.info.run_id, logged.path)).read_text()
    matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json")).read_text())
    assert matrix["test"] == run_stream(load_experiment(path).base).test.accuracy_matrix
    history = client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # each stage once, the unreported one included
    if damage == "unreported":  # stage 3 logged from its report as first made, not from a second training
        assert [m.value for m in history if m.step == 3] == [m.value for m in first if m.step == 3]
        assert {m.step for m in first} == {1, 2, 3}


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_sweep_resumed_from_moved_storage_continues_its_runs_in_the_store_it_is_given(ray_local, tmp_path, capsys,
                                                                                        store, request):
    """`clorch resume NAME --storage NEW --tracking-uri NEW_STORE` after copying both: the same parent and child
    runs continue in the new store, each stage logged once, and nothing is written where the sweep was. The
    store is a SQLite file, or an `mlflow server` over PostgreSQL whose database (and artifacts) are copied."""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "moved.yaml"
    path.write_text(VERIFY)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    empty_uri = f"sqlite:///{tmp_path / 'empty.db'}"  # a store without the sweep's runs (any kind will do)
    if store == "sqlite":
        old_uri, new_uri = f"sqlite:///{old / 'mlflow.db'}", f"sqlite:///{new / 'mlflow.db'}"
    else:
        postgres, start_server = request.getfixturevalue("postgres"), request.getfixturevalue("mlflow_server")
        old_db = postgres.create_database("moved_old")
        old_server = start_server(old_db, artifacts=old / "artifacts")
        old_uri = old_server.uri
    assert main(["sweep", str(path), "--name", "m", "--storage", str(old / "runs"), "--tracking-uri", old_uri]) == 1
    _, (parent,), (child,) = runs_of(old_uri, "m")
    assert parent.info.status == "FAILED" and child.info.status == "FAILED"
    shutil.copytree(old / "runs", new / "runs")
    if store == "sqlite":
        shutil.copy(old / "mlflow.db", new / "mlflow.db")
    else:  # the database copied (which needs its server gone), the artifacts with it, a new server over both
        old_server.stop()
        new_db = postgres.copy_database(old_db, "moved_new")
        shutil.copytree(old / "artifacts", new / "artifacts")
        new_uri = start_server(new_db, artifacts=new / "artifacts").uri
    # and the trial-to-run map lost (as when a driver dies between creating a run and recording it): the
    # runs are found again by their tags (clorch.sweep_id, clorch.trial_id, mlflow.parentRunId)
    (new / "runs" / ".clorch" / "m" / "mlflow_runs.json").write_text('{"parent": null, "trials": {}}')
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    old_rows = postgres.snapshot(old_db) if store == "postgresql" else None

    capsys.readouterr()
    assert main(["resume", "m", "--storage", str(tmp_path / "nowhere" / "runs"), "--tracking-uri", new_uri]) == 2
    assert main(["resume", "m", "--storage", str(old / "runs"), "--tracking-uri", empty_uri]) == 2  # no such runs
    err = capsys.readouterr().err
    assert "holds no parent run" in err and not (tmp_path / "empty.db").exists()
    # the resume that continues, in a process of its own as a user runs it: MLflow keeps each run's artifact
    # location for the life of a process, keyed by run id alone, so this one would still upload to the old server
    resume = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "m", "--address",
                             ray_local.get_runtime_context().gcs_address, "--storage", str(new / "runs"),
                             "--tracking-uri", new_uri], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]

    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # the old place untouched
    if store == "postgresql":  # and so is the old database
        assert postgres.snapshot(old_db) == old_rows and old_rows["runs"] and old_rows["metrics"]
    client, parents, children = runs_of(new_uri, "m")
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
    assert [c.info.run_id for c in children] == [child.info.run_id] and children[0].info.status == "FINISHED"
    for split in ("val", "test"):
        steps = [m.step for m in client.get_metric_history(child.info.run_id, f"{split}/accuracy_on_seen_classes")]
        assert sorted(steps) == [1, 2, 3, 4, 5]  # stages 1-3 from before the move, 4-5 after it, each once
    matrix = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json")).read_text())
    assert matrix["test"] == run_stream(load_experiment(path).base).test.accuracy_matrix
    codebooks = {a.path for a in client.list_artifacts(child.info.run_id, "codebooks")}
    assert {"codebooks/keys.npy", "codebooks/stage_1.npz", "codebooks/stage_5.npz"} <= codebooks  # both sides


@pytest.mark.slow
# A PostgreSQL-backed server killed mid-sweep is tests/test_chaos.py's outage; here the SQLite-backed server, and
# the PostgreSQL database under a live server
@pytest.mark.parametrize("store, down", [("sqlite", "mlflow server"), ("postgresql", "database")],
                         ids=["sqlite", "postgresql-down"])
def test_an_mlflow_server_down_mid_sweep_loses_no_stage_and_logs_none_twice(ray_local, tmp_path, caplog, store, down,
                                                                            mlflow_server, request):
    """A sweep logging to an `mlflow server` over SQLite or over PostgreSQL, the server (or, behind it, the
    PostgreSQL server) killed after the first stage and started again on its port a few stages later: every
    stage of every trial is in MLflow once."""
    import threading
    import time

    backend = request.getfixturevalue("pg_database") if store == "postgresql" else f"sqlite:///{tmp_path / 's.db'}"
    server = mlflow_server(backend)
    # what goes down: the MLflow server, or the database under a server that keeps answering (with errors)
    postgres = request.getfixturevalue("postgres") if down == "database" else None
    crash, restart = (lambda: postgres.stop(crash=True), postgres.start) if postgres else (server.stop, server.start)
    uri = server.uri
    path = tmp_path / "outage.yaml"
    # four trials one after another (20 stages): the server is back while trials still report
    path.write_text(TWO_TRIALS.replace("classes_per_stage: 5", "classes_per_stage: 2").replace("epochs: 20", "epochs: 5")
                    .replace("[0, 1]", "[0, 1, 2, 3]") + "tune:\n  max_concurrent_trials: 1\n")
    args = ["--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    codes = []
    sweep = threading.Thread(target=lambda: codes.append(main(["sweep", str(path), "--name", "o", *args])))

    def stages_reported() -> int:
        return sum(len(f.read_text().splitlines()) for f in (tmp_path / "runs" / "o").glob("*/result.json"))

    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator"):
            sweep.start()
            while stages_reported() < 1:
                time.sleep(0.1)
            crash()  # down after the first stage, as a crash would take it...
            while stages_reported() < 4 and sweep.is_alive():
                time.sleep(0.1)
            restart()  # ...and back on the same port a few stages later
            sweep.join(timeout=300)
        assert codes == [0]
        said = [r.getMessage() for r in caplog.records]
        assert any("failed" in m and "wait in" in m for m in said)  # the outage was met, and queued...
        assert any("answers again; every queued write is in" in m for m in said)  # ...and written mid-sweep
        client, parents, children = runs_of(uri, "o")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
        for child in children:
            assert child.info.status == "FINISHED"
            for split in ("val", "test"):
                history = client.get_metric_history(child.info.run_id, f"{split}/accuracy_on_seen_classes")
                assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # every stage, each once
        assert not (tmp_path / "runs" / ".clorch" / "o" / "mlflow_outbox.jsonl").exists()
    finally:
        if postgres is not None and not postgres.running:
            postgres.start()  # the session's server, for the tests after this one
        if sweep.is_alive():  # the fixture stops the server: never under a sweep still logging
            sweep.join(timeout=300)


@pytest.mark.parametrize("configured, gpu_ids, cuda, expected", [
    ("auto", [], True, "cpu"),  # a GPU on the node, none reserved: the CPU, or Ray would not count the trial
    ("auto", ["0"], True, "cuda"),
    ("cpu", ["0"], True, "cpu"),
    ("auto", [], False, "cpu"),
    ("cuda", [], True, "device: cuda, but Ray reserved no GPU for this trial"),
    ("auto", ["0"], False, "cpu"),  # a node that declares a GPU torch cannot use: a warning, and the CPU
])
def test_a_trial_uses_cuda_only_with_a_gpu_reservation(configured, gpu_ids, cuda, expected):
    from orchestrator.trial import trial_device
    from workloads.config import ConfigError

    if expected.startswith("device:"):
        with pytest.raises(ConfigError, match=expected):
            trial_device(configured, gpu_ids, cuda)
    else:
        assert trial_device(configured, gpu_ids, cuda) == expected


@pytest.mark.slow
def test_four_quarter_gpu_trials_share_one_declared_gpu_and_ray_counts_them(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "share.yaml"
    path.write_text(TWO_TRIALS.replace("classes_per_stage: 5", "classes_per_stage: 2").replace("[0, 1]", "[0, 1, 2, 3]")
                    + "tune:\n  resources: {gpus_per_trial: 0.25}\n")
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "gpu_share_sweep.py"), str(path),
                           str(tmp_path / "runs"), f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, proc.stderr[-3000:]
    assert report["fewest_gpus"] == 0.0  # all four quarters held at once, as Ray accounts them
    assert len(report["trials"]) == 4
    # each held GPU 0 (a quarter of it); torch sees no CUDA on this node, so each ran on the CPU and said why
    assert all(t == [["0", "cpu"]] for t in report["trials"].values()), report["trials"]


@pytest.mark.slow
def test_ctrl_c_ends_the_runs_killed_and_points_at_clorch_resume(ray_local, tmp_path):
    """SIGINT to a running `clorch sweep`: Tune's advice (a Python call to Tuner.restore) is replaced by the
    clorch resume command, the parent and unfinished child runs end KILLED, and the resume finishes them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "long.yaml"
    path.write_text(TWO_TRIALS.replace("classes_per_stage: 5", "classes_per_stage: 2")
                    .replace("epochs: 20", "epochs: 80"))
    uri, args = sweep_args(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--name", "c", *args,
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.time() + 120
    while not list((tmp_path / "runs" / "c").glob("*/result.json")):
        assert time.time() < deadline and proc.poll() is None, "no stage was reported"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert f"continue with `clorch resume c --storage {tmp_path / 'runs'}`" in out, out[-2000:] + err[-2000:]
    assert "Tuner.restore" not in out + err
    _, (parent,), children = runs_of(uri, "c")
    assert parent.info.status == "KILLED" and {c.info.status for c in children} >= {"KILLED"}
    assert main(["resume", "c", *args]) == 0
    _, (parent,), children = runs_of(uri, "c")
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED", "FINISHED"]


@pytest.mark.slow
def test_a_driver_killed_between_a_trials_end_and_tunes_next_snapshot_never_runs_it_again(ray_local, tmp_path):
    """Tune snapshots its state at every stage checkpoint, not when a trial ends: a driver killed in between
    leaves a finished trial RUNNING, with its last stage's checkpoint, in the snapshot a resume reads. That
    trial must not train or report again, and its run keeps one model."""
    path = tmp_path / "window.yaml"
    path.write_text(VERIFY.replace("tune:\n  fail_at_stage: 3\n", ""))
    uri, args = sweep_args(tmp_path)
    assert main(["sweep", str(path), "--name", "w", *args]) == 0
    experiment = tmp_path / "runs" / "w"
    (result,) = experiment.glob("*/result.json")
    reported = result.read_text()
    snapshot = sorted(experiment.glob("experiment_state-*.json"))[-1]
    state = json.loads(snapshot.read_text())
    for entry in state["trial_data"]:  # the snapshot as it stood between the last report and the trial's end
        trial = json.loads(entry[0])
        assert trial["status"] == "TERMINATED"
        entry[0] = json.dumps({**trial, "status": "RUNNING"})
    snapshot.write_text(json.dumps(state))

    assert main(["resume", "w", *args]) == 0
    assert result.read_text() == reported  # nothing trained or reported again
    client, (parent,), (child,) = runs_of(uri, "w")
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "test/accuracy_on_seen_classes")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    models = client.search_logged_models([child.info.experiment_id],
                                         filter_string=f"source_run_id = '{child.info.run_id}'")
    assert len(models) == 1


@pytest.mark.slow
def test_a_trial_runs_as_many_torch_threads_as_cpus_ray_reserved_for_it(ray_local, tmp_path):
    base = TWO_TRIALS.replace("epochs: 20", "epochs: 1").replace("[0, 1]", "[0]")
    for name, resources, threads in [("own", "{num_workers: 0, cpus_per_trial: 2}", 2),
                                     ("worker", "{num_workers: 1, cpus_per_worker: 1}", 1)]:
        (tmp_path / name).mkdir()
        path = tmp_path / f"{name}.yaml"
        path.write_text(base + f"tune:\n  resources: {resources}\n")
        uri, args = sweep_args(tmp_path / name)
        assert main(["sweep", str(path), "--name", name, *args]) == 0
        (result,) = (tmp_path / name / "runs" / name).glob("*/result.json")
        assert {json.loads(line)["torch_threads"] for line in result.read_text().splitlines()} == {threads}
