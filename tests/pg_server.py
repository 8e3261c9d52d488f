"""Real servers for the tests, no mocks: a PostgreSQL server in a temporary folder and `mlflow server` processes
over it (or over SQLite), each on 127.0.0.1 and a free port, which a test can stop and start again.

PostgreSQL refuses to run as root, so under root (as in CI) initdb and postgres run as the `postgres` system
user (Debian's package creates it) in a folder that user owns; under any other user they run as that user.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

# What to say when PostgreSQL is missing: the README's test command installs it, so a missing server is an
# install that went wrong, never a reason to skip the tests that need it.
INSTALL_HINT = ("install Debian's postgresql package (`apt-get update && apt-get install -y postgresql`, which "
                "the README's test command does) or put PostgreSQL's bin folder (initdb, pg_ctl) on PATH")


class ServerFailed(RuntimeError):
    """A server that is missing, or did not come up; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path:
    """The folder of PostgreSQL's server programs: `pg_config --bindir`, else the newest of Debian's
    /usr/lib/postgresql/*/bin, else wherever initdb is on PATH."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    # Debian keeps the server programs out of PATH; sort by major version number, newest first
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True,
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for folder in candidates:
        if folder and all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    looked = ", ".join(c for c in candidates if c) or "pg_config, /usr/lib/postgresql/*/bin, PATH"
    raise ServerFailed(f"PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found (looked in {looked}); "
                       + INSTALL_HINT)


def _as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL program as a user it accepts (never root)."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerFailed("running as root, and PostgreSQL refuses root, but there is no `postgres` user to run "
                           "it as; " + INSTALL_HINT) from None
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class PostgresServer:
    """One PostgreSQL cluster in a fresh temporary folder, listening on 127.0.0.1:port (TCP, password auth)
    and on a socket in that folder only. Databases are made per test with `create_database`."""

    ROLE = "clorch"  # the role MLflow connects as: not a superuser, owner of the databases it uses

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="clorch-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.superuser_password = secrets.token_hex(16)
        self.password = secrets.token_hex(16)  # the ROLE's
        self._prefix = _as_server_user()
        self._made = 0
        self.running = False

    def start(self) -> None:
        """initdb (first time only) and start the server; ServerFailed with its log if it does not come up."""
        if not self.data.exists():
            pwfile = self.root / "superuser.pw"
            with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(self.superuser_password + "\n")
            if self._prefix:
                shutil.chown(self.root, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
            # scram passwords over TCP, as on the cluster; the socket (in this private folder) trusts its user
            self._run("initdb", "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
                      "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
            pwfile.unlink()
        # fsync off: the tests need a real server, not durability on a machine crash
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        self.running = True
        self._bootstrap_role()

    def _bootstrap_role(self) -> None:
        with closing(self.connect("postgres")) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.ROLE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE ROLE "{self.ROLE}" LOGIN PASSWORD %s', (self.password,))

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise ServerFailed(f"PostgreSQL: `{tool}` exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}"
                               f"\nserver log:\n{_tail(self.log)}")

    def connect(self, database: str, user: str = "postgres"):
        """A psycopg2 connection in autocommit mode (CREATE DATABASE cannot run in a transaction); close it with
        contextlib.closing, since psycopg2's own `with` opens a transaction even in autocommit mode."""
        try:
            import psycopg2
        except ImportError:
            raise ServerFailed("psycopg2 is not installed; `pip install -e '.[dev]'` installs it") from None
        password = self.superuser_password if user == "postgres" else self.password
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname=database, user=user, password=password,
                                connect_timeout=10)
        conn.autocommit = True
        return conn

    def create_database(self, hint: str = "test") -> str:
        """A new, empty database owned by ROLE; its SQLAlchemy URI (what `--backend-store-uri` takes)."""
        name = self._new_name(hint)
        with closing(self.connect("postgres")) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}" OWNER "{self.ROLE}"')
        return self.uri(name)

    def copy_database(self, uri: str, hint: str = "copy") -> str:
        """A new database with the contents of the one at `uri` (nothing may be connected to it); its URI."""
        source, name = uri.rsplit("/", 1)[1], self._new_name(hint)
        with closing(self.connect("postgres")) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}" OWNER "{self.ROLE}"')
        return self.uri(name)

    def snapshot(self, uri: str) -> dict[str, list[tuple]]:
        """Every row of every table of the database at `uri`, sorted: equal snapshots, equal contents."""
        with closing(self.connect(uri.rsplit("/", 1)[1])) as conn, conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = sorted(name for (name,) in cur.fetchall())
            rows = {}
            for table in tables:
                cur.execute(f'SELECT * FROM "{table}"')
                rows[table] = sorted(cur.fetchall(), key=repr)
        return rows

    def _new_name(self, hint: str) -> str:
        self._made += 1  # unique in this server; the hint (a test's name) says whose it is
        return "".join(c if c.isalnum() else "_" for c in hint.lower())[:40] + f"_{self._made}"

    def uri(self, database: str) -> str:
        """The URI MLflow connects to `database` with, as ROLE (the password is random per session). The driver
        is named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, and clorch installs psycopg2."""
        return f"postgresql+psycopg2://{self.ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self, crash: bool = False) -> None:
        """Stop the server, cutting open connections (`crash`: at once, without a checkpoint, as a crash would);
        `start` brings it back on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate" if crash else "fast", "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        """Stop the server if it runs, and remove its folder."""
        if self.data.exists():
            try:
                self.stop()
            except ServerFailed:
                pass  # not running: it never started, or a test stopped it
        shutil.rmtree(self.root, ignore_errors=True)


class MLflowServer:
    """`mlflow server` on 127.0.0.1 over `backend_uri` with artifacts in `folder`, one worker by default;
    `stop` kills it as a crash would, `start` brings it back on the same port."""

    def __init__(self, backend_uri: str, folder: Path, workers: int = 1, app_name: str | None = None,
                 env: dict[str, str] | None = None, port: int | None = None, artifacts: Path | None = None) -> None:
        self.backend_uri, self.folder = backend_uri, Path(folder)
        self.artifacts = Path(artifacts) if artifacts else self.folder / "artifacts"
        self.workers, self.app_name, self.env = workers, app_name, env or {}
        self.port = port or free_port()
        self.log = self.folder / f"mlflow-server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> MLflowServer:
        """Start the server and wait until /health answers; ServerFailed with its log if it does not."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", self.backend_uri, "--workers", str(self.workers),
                   "--artifacts-destination", str(self.artifacts)]
        if self.app_name:
            command += ["--app-name", self.app_name]
        with open(self.log, "ab") as log:  # appended: a restart keeps the first run's lines
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                            env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except (urllib.error.URLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited {self.process.returncode}" if self.process.poll() is not None
                           else f"did not answer {self.uri}/health within {timeout_s:g} s")
                    self.stop()
                    raise ServerFailed(f"mlflow server over {self.backend_uri.split('@')[-1]} {why}; its log:\n"
                                       f"{_tail(self.log)}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        """Kill the server and its workers (SIGKILL to its process group, as a crash would)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None


def basic_auth_env(folder: Path, users_database_uri: str, admin_username: str, admin_password: str) -> dict[str, str]:
    """The environment of an `mlflow server --app-name basic-auth` whose users live in `users_database_uri`:
    its config file (written 0600: it holds the admin's password and the database's), and a CSRF secret."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("[mlflow]\ndefault_permission = READ\n"
                f"database_uri = {users_database_uri}\nadmin_username = {admin_username}\n"
                f"admin_password = {admin_password}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
