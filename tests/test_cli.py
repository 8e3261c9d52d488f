"""`clorch run` end to end: the table, the JSON, and one-line errors with exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main

QUICKSTART = str(Path(__file__).parent.parent / "search_spaces" / "quickstart.yaml")


def test_run_prints_a_stage_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["run", QUICKSTART, "--set", "train.epochs=2", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "stage" in table and "val acc" in table and "test acc" in table
    assert sum(1 for line in table.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"], ["4"], ["5"])) == 5
    assert "protocol: validation: 0.1 of each stage's training data held out" in table
    assert "protocol: no future inputs: setup saw the first stage's inputs only" in table
    result = json.loads(out.read_text())
    assert result["protocol"] == {"axis": "stage", "validation": 0.1, "selection_split": "val",
                                  "setup_inputs": "first_stage", "future_inputs": False}
    for split in ("val", "test"):  # both splits, with the same metrics
        for key in ("accuracy_matrix", "average_accuracy", "average_incremental_accuracy", "forgetting", "bwt",
                    "accuracy_on_seen_classes", "class_accuracy_matrix"):
            assert key in result[split], (split, key)
        assert len(result[split]["accuracy_matrix"]) == 5 and len(result[split]["accuracy_matrix"][0]) == 5
        assert result[split]["average_accuracy"] > 0.7
    assert result["config"]["train"]["epochs"] == 2 and result["config"]["learner"]["name"] == "dkvb"


def test_run_without_a_validation_set_says_so_and_future_inputs_are_printed(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["run", QUICKSTART, "--set", "train.epochs=1", "--set", "data.validation=0",
                 "--set", "learner.key_init_data=stream", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "val acc" not in table and "no validation set exists" in table
    assert "FUTURE INPUTS USED" in table
    result = json.loads(out.read_text())
    assert result["val"] is None and result["test"]["accuracy_matrix"]
    assert result["protocol"]["future_inputs"] is True and result["protocol"]["selection_split"] is None


def test_run_with_a_memory_shows_its_size_per_stage(capsys):
    assert main(["run", QUICKSTART, "--set", "train.epochs=1", "--set", "rehearsal.memory_size=30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:1] == ["stage"] and line.split()[-1] == "memory" for line in lines)
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["5"])]
    assert [row[-1] for row in rows] == ["30", "30"]  # quotas 15 then 3 per class: the effective size


def _experiment(tmp_path, text: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_cache_command_fills_the_caches_a_sweep_needs(tmp_path, capsys):
    path = _experiment(tmp_path, f"""
base:
  cache_dir: {tmp_path / 'cache'}
  data: {{source: digits}}
  backbone: {{name: small_cnn}}
  learner: {{name: dkvb, num_codebooks: 4, num_keys: 16, key_dim: 4}}
sweep:
  learner.num_keys: {{grid: [16, 32]}}
  train.lr: {{grid: [0.1, 1.0]}}
""")
    assert main(["cache", path]) == 0
    out = capsys.readouterr().out
    assert "2 config(s) with distinct caches" in out and "encoded 1797 inputs" in out
    assert len(list((tmp_path / "cache" / "features").glob("*.arrow"))) == 2
    assert len(list((tmp_path / "cache" / "keys").glob("*.pt"))) == 2  # one per key config, not per lr
    assert main(["cache", path]) == 0
    assert "embeddings already cached" in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_refuses_a_port_in_use(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert f"--port: 127.0.0.1:{port} is already in use" in capsys.readouterr().err


# `clorch ui` served and ended by SIGTERM: tests/test_quoted_commands.py, which runs the README's `clorch ui`


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the plan below is a CPU machine's")
def test_sweep_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where storage and the MLflow store would default
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sweep", QUICKSTART, "--dry-run", "--num-cpus", "3"]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s) (grid search, num_samples 1)" in out  # 2 key counts x 2 seeds
    assert "each trial reserves 1 CPU in its own process" in out
    assert "this cluster (3 CPU, 0 GPU) runs 3 at a time" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, says", [
    ([], "--storage: clorch_runs is relative, and under `ray job submit`"),
    (["--storage", "/tmp/x"], "--tracking-uri: sqlite:///mlflow.db is relative"),
])
def test_relative_defaults_are_refused_under_ray_job_submit(tmp_path, monkeypatch, capsys, flags, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's entrypoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sweep", QUICKSTART, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "accepted: " in err[0]
    assert list(tmp_path.iterdir()) == []
