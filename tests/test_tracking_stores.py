"""clorch against real tracking stores beyond a SQLite file: a PostgreSQL database opened by the driver itself,
and an MLflow server behind MLflow's basic-auth app (over PostgreSQL). No mocks: the servers of tests/pg_server.py."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from orchestrator.cli import main
from pg_server import basic_auth_env

TINY = """
base:
  data: {source: digits, classes_per_stage: 5}
  learner: {name: dkvb, num_codebooks: 8, num_keys: 32, key_dim: 4}
  train: {epochs: 2, batch_size: 32}
tracking: {log_model: false}
"""


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("clorch: error: "), err
    return err[0]


def test_a_postgresql_store_that_refuses_the_connection_is_one_line_and_nothing_is_written(
        postgres, pg_database, tmp_path, monkeypatch, capsys):
    """A wrong password (from PGPASSWORD, where libpq reads it) or a database that does not exist: refused
    before Ray starts, in seconds rather than MLflow's minutes of retries, without the password."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    no_password = pg_database.replace(f":{postgres.password}@", "@")
    monkeypatch.setenv("PGPASSWORD", "wrong-" + postgres.password)
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri", no_password]) == 2
    line = one_error_line(capsys)
    assert "refuses a connection" in line and "password authentication failed" in line and postgres.password not in line
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    missing = no_password.rsplit("/", 1)[0] + "/no_such_database"
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri", missing]) == 2
    assert 'database "no_such_database" does not exist' in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_sweep_logs_straight_to_postgresql_with_the_password_from_the_environment(
        ray_local, postgres, pg_database, tmp_path, monkeypatch):
    """--tracking-uri postgresql+psycopg2://USER@HOST/DB, the password in PGPASSWORD: the driver's MLflow client
    writes the runs into PostgreSQL, and the password is nowhere in the sweep's files."""
    from test_sweep import runs_of

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    uri = pg_database.replace(f":{postgres.password}@", "@")
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    assert main(["sweep", str(path), "--name", "pg", "--storage", str(tmp_path / "runs"), "--tracking-uri", uri]) == 0
    client, (parent,), (child,) = runs_of(uri, "pg")
    assert parent.info.status == child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "test/average_accuracy")) == [1, 2]
    assert json.loads((tmp_path / "runs" / ".clorch" / "pg" / "sweep.json").read_text())["tracking_uri"] == uri
    assert not any(postgres.password in p.read_text(errors="ignore") for p in (tmp_path / "runs").rglob("*")
                   if p.is_file())


@pytest.mark.slow
def test_a_sweep_logs_through_mlflows_basic_auth_app_with_credentials_from_the_environment(
        ray_local, postgres, pg_database, mlflow_server, tmp_path, monkeypatch, capsys):
    """`mlflow server --app-name basic-auth` over PostgreSQL (runs and users): without credentials, or with a
    wrong password, the sweep is refused in one line before Ray starts; with MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD it logs its runs, which the server shows to that user only."""
    from mlflow.tracking import MlflowClient

    from test_sweep import runs_of

    admin, password = "clorch-admin", secrets.token_hex(12)
    env = basic_auth_env(tmp_path / "auth", postgres.create_database("auth_users"), admin, password)
    assert (Path(env["MLFLOW_AUTH_CONFIG_PATH"]).stat().st_mode & 0o777) == 0o600
    server = mlflow_server(pg_database, app_name="basic-auth", env=env)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    args = ["sweep", str(path), "--name", "auth", "--storage", str(tmp_path / "runs"), "--tracking-uri", server.uri]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials of this machine's user
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert main(args) == 2
    assert "asks for a user and password, and none is set (UNAUTHENTICATED)" in one_error_line(capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + password)
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"refuses user '{admin}' (wrong user or password)" in line and password not in line
    assert not (tmp_path / "runs").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    assert main(args) == 0
    client, (parent,), (child,) = runs_of(server.uri, "auth")
    assert parent.info.status == child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "test/average_accuracy")) == [1, 2]
    assert "accuracy_matrix.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException, match="401"):  # the runs are behind the server's authentication
        MlflowClient(server.uri).get_run(child.info.run_id)
