"""The setup that is written down rather than run by clorch: the README's test command and CI, cluster.yaml's
head node (PostgreSQL, the MLflow server behind basic auth, the files holding its secrets)."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The one-line commands of the README's Quickstart, in order."""
    text = (REPO / "README.md").read_text()
    quickstart = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 1)]
    return [block.split("```", 1)[0].strip() for block in quickstart.split("```bash\n")[1:]]


def test_ci_runs_exactly_the_readmes_test_command():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)  # two commands, one line each
    run = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert run[-1] == commands[1]
    # it installs what the tests need first: PostgreSQL and Chromium only when missing, psycopg2 with the dev extra
    assert commands[1].startswith("(dpkg -s postgresql chromium >/dev/null 2>&1 || (apt-get update && ")
    assert 'pip install -e ".[dev]"' in commands[1]


def cluster() -> dict:
    import yaml

    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def head_command(fragment: str) -> str:
    """The one command of the head's setup or start that contains `fragment`."""
    config = cluster()
    (command,) = [c for c in config["head_setup_commands"] + config["head_start_ray_commands"] if fragment in c]
    return command


SECRETS = {"MLFLOW_DB_PASSWORD": "db-" + "a1" * 10, "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-" + "b2" * 10, "MLFLOW_FLASK_SERVER_SECRET_KEY": "c3" * 16}


def write_secrets(home: Path, **values: str) -> Path:
    """~/.clorch/mlflow.env as the top of cluster.yaml makes it (here readable by all, as a careless copy is)."""
    path = home / ".clorch" / "mlflow.env"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in {**SECRETS, **values}.items() if v is not None))
    path.chmod(0o644)
    return path


def on_head(command: str, home: Path, **env: str):
    """Run one of cluster.yaml's commands in bash as the head would, with HOME at `home`."""
    import os
    import subprocess

    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(home), **env})


def test_the_head_refuses_a_secrets_file_that_would_break_the_files_it_writes(tmp_path):
    check = head_command("grep -Eq")
    for bad in ({"MLFLOW_DB_PASSWORD": None}, {"MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
                {"MLFLOW_DB_PASSWORD": "quote'" + "x" * 12}, {"MLFLOW_AUTH_ADMIN_USERNAME": "ad min"}):
        write_secrets(tmp_path, **bad)
        done = on_head(check, tmp_path)
        assert done.returncode != 0 and "~/.clorch/mlflow.env: " + next(iter(bad)) in done.stderr, (bad, done)
    path = write_secrets(tmp_path)
    assert on_head(check, tmp_path).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


def test_the_head_writes_each_secret_where_its_reader_looks_owner_only(tmp_path):
    """~/.pgpass (libpq), MLflow's auth config (the server), ~/.mlflow/credentials (MLflow's client in clorch's
    driver): 0600, with the values of ~/.clorch/mlflow.env, and no password in the server's command line."""
    import configparser

    write_secrets(tmp_path)
    done = on_head(head_command("~/.pgpass"), tmp_path)
    assert done.returncode == 0, done.stderr
    files = [tmp_path / ".pgpass", tmp_path / ".clorch" / "basic_auth.ini", tmp_path / ".mlflow" / "credentials"]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert files[0].read_text() == f"127.0.0.1:5432:*:mlflow:{SECRETS['MLFLOW_DB_PASSWORD']}\n"
    auth, creds = configparser.ConfigParser(), configparser.ConfigParser()
    auth.read(files[1])
    creds.read(files[2])
    assert auth["mlflow"]["database_uri"] == "postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow_auth"
    assert (auth["mlflow"]["admin_username"], auth["mlflow"]["admin_password"]) == (
        SECRETS["MLFLOW_AUTH_ADMIN_USERNAME"], SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
        creds["mlflow"]["mlflow_tracking_username"], creds["mlflow"]["mlflow_tracking_password"])
    server = head_command("mlflow server")
    assert not any(secret in server for secret in SECRETS.values()) and "$MLFLOW" not in server
    assert "--host 127.0.0.1" in server and "--workers 2" in server
    config = cluster()
    assert config["file_mounts"]["~/.clorch/mlflow.env"] == "~/.clorch/mlflow.env"
    assert "rm -f ~/.clorch/mlflow.env" in " ".join(config["worker_setup_commands"])  # the head's alone


@pytest.mark.slow
def test_the_heads_postgresql_and_mlflow_server_commands_give_a_server_only_its_users_can_log_to(
        postgres, tmp_path, monkeypatch):
    """cluster.yaml's commands for the head, run here against this session's PostgreSQL (its superuser instead
    of `sudo -u postgres`, its port instead of 5432, a folder instead of the shared disk): the role and databases
    made (twice, as every `ray up` does), the secrets' files written, and the MLflow server started exactly as
    on the head; MLflow's client then logs with ~/.mlflow/credentials and nothing else, and clorch's check passes."""
    import os
    import signal
    import subprocess
    import sys
    from contextlib import closing

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.cluster import check_tracking
    from pg_server import ServerFailed, free_port

    port = free_port()
    local = {"5432": str(postgres.port), "/mnt/shared/mlflow_artifacts": str(tmp_path / "artifacts"),
             "--port 5000": f"--port {port}", "sudo -u postgres psql": f"{postgres.bindir / 'psql'} -h 127.0.0.1 "
             f"-p {postgres.port} -U postgres"}

    def here(command: str) -> str:
        for old, new in local.items():
            command = command.replace(old, new)
        return command

    write_secrets(tmp_path)
    for _ in range(2):
        done = on_head(here(head_command("CREATE ROLE mlflow")), tmp_path, PGPASSWORD=postgres.superuser_password)
        assert done.returncode == 0, done.stderr
    with closing(postgres.connect("postgres")) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE 'mlflow%'")
        assert sorted(cur.fetchall()) == [("mlflow", "mlflow"), ("mlflow_auth", "mlflow")]
    assert on_head(here(head_command("~/.pgpass")), tmp_path).returncode == 0

    venv = str(Path(sys.executable).parent)  # `mlflow` on PATH, as the head's virtualenv puts it
    server = subprocess.Popen(["bash", "-c", here(head_command("mlflow server"))], start_new_session=True,
                              env={"PATH": f"{venv}:{os.environ['PATH']}", "HOME": str(tmp_path)})
    uri = f"http://127.0.0.1:{port}"
    try:
        import time
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    log = (tmp_path / "mlflow" / "server.log").read_text()[-3000:]
                    raise ServerFailed(f"the head's mlflow server did not answer {uri}/health; its log:\n{log}")
                time.sleep(0.5)
        monkeypatch.setenv("HOME", str(tmp_path))  # the client's credentials: ~/.mlflow/credentials alone
        for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
            monkeypatch.delenv(variable, raising=False)
        check_tracking(uri)  # what clorch sweep asks before Ray starts
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("head"))
        client.log_metric(run.info.run_id, "val/average_accuracy", 0.5, step=0)
        assert client.get_run(run.info.run_id).data.metrics == {"val/average_accuracy": 0.5}
        (tmp_path / ".mlflow" / "credentials").unlink()
        with pytest.raises(MlflowException, match="401"):
            client.get_run(run.info.run_id)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # bash and the server it left running in the background
        server.wait(timeout=30)
