"""Where a sweep runs: the embedded default (local Ray, SQLite MLflow in the working directory) or a cluster."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from workloads.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "clorch_runs"  # under the working directory
DEFAULT_TRACKING = "sqlite:///mlflow.db"
RAY_JOB_DRIVER = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the environment of a `ray job submit` entrypoint


@dataclass
class Target:
    """The Ray address (None: local), the storage folder for experiments, and the MLflow tracking URI."""

    address: str | None
    storage: Path
    tracking_uri: str


def resolve_target(address: str | None, storage: str | None, tracking_uri: str | None) -> Target:
    """Fill in the embedded defaults: local Ray, ./clorch_runs, sqlite:///mlflow.db (absolute paths)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    storage_path = Path(storage or DEFAULT_STORAGE).expanduser().resolve()
    if storage_path.exists() and not storage_path.is_dir():
        raise ConfigError(f"--storage: {storage_path} is a file; give a folder (it is created if missing)")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING
    if RAY_JOB_DRIVER in os.environ:  # under `ray job submit`: the working directory is the job's own copy
        if not Path(storage or DEFAULT_STORAGE).expanduser().is_absolute():
            raise ConfigError(f"--storage: {storage or DEFAULT_STORAGE} is relative, and under `ray job submit` the "
                              "working directory is Ray's temporary copy of --working-dir, deleted with the job; "
                              "accepted: an absolute folder every node sees (e.g. --storage /mnt/shared/clorch_runs)")
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            raise ConfigError(f"--tracking-uri: {uri} is relative, and under `ray job submit` it would land in the "
                              "job's temporary working directory; accepted: the head's MLflow server "
                              "(--tracking-uri http://127.0.0.1:5000) or an absolute sqlite:////path")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return Target(address, storage_path, uri)


# Settings clorch chooses on purpose, whose warnings would only tell the user to undo them (set unless the user
# set them): Tune snapshots the experiment at every stage because CheckpointConfig(num_to_keep=1) makes a
# restart resume from the last stage reported (sweep.build_tuner), so its "snapshotting ... may become a
# bottleneck" advice is off; MLflow's INFO lines (creating a SQLite store's tables) are not the user's business.
CHOSEN_SETTINGS = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
                   "MLFLOW_LOGGING_LEVEL": "WARNING"}


def quiet_chosen_settings() -> None:
    """Silence, at their source, the warnings about settings clorch chose (CHOSEN_SETTINGS); errors still show."""
    for key, value in CHOSEN_SETTINGS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # when mlflow was imported already


def connect(target: Target, num_cpus: int | None = None) -> None:
    """Start or join Ray; a multi-node cluster needs storage that every node sees."""
    import ray

    quiet_chosen_settings()

    if target.address:
        join(target.address)
    elif not ray.is_initialized():
        secure_token_file(local=True)
        start_local(num_cpus)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        missing = nodes_missing_storage(target.storage, nodes)
        if missing:
            raise ConfigError(f"--storage: {target.storage} is not visible from {len(missing)} of the cluster's "
                              f"{len(nodes)} nodes; pass a folder that every node mounts (NFS, a shared disk)")


def join(address: str) -> None:
    """Join the Ray cluster at `address` (unless this process is in a Ray already); a wrong address or a missing
    token ends in one ConfigError line."""
    import ray

    check_reachable(address)
    if ray.is_initialized():
        return
    secure_token_file(local=False)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, ray.exceptions.AuthenticationError, ray.exceptions.RaySystemError) as e:
        raise ConfigError(f"--address: could not join the Ray cluster at {address} ({_first_line(e)}); "
                          "check the address, and on a cluster with token authentication set "
                          "RAY_AUTH_MODE=token (and its token) in this shell") from None


def start_local(num_cpus: int | None = None) -> None:
    """A new local Ray (never a cluster some `ray start` left on this machine) whose every server listens on
    127.0.0.1 only.

    Ray has no bind-address option: its servers listen on loopback exactly when the node's address is
    127.0.0.1, and it takes that address only on a node that may not join a cluster, which Ray decides from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported (ray._private.ray_constants.ENABLE_RAY_CLUSTER).
    The variable goes to the processes Ray starts, the constant to this one, which imported Ray already.
    """
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Token authentication is Ray's default for a local start (RAY_AUTH_MODE unset), announced on every start
    # with a hint to opt out: clorch keeps it on and keeps the line out of its one-line errors and tables.
    announcer = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = DropMessages("Token authentication is enabled for this Ray cluster")
    announcer.addFilter(quiet)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    finally:
        announcer.removeFilter(quiet)


class DropMessages(logging.Filter):
    """Drops the records whose message starts with `prefix` (`dropped` counts them)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.dropped = prefix, 0

    def filter(self, record: logging.LogRecord) -> bool:
        drop = record.getMessage().startswith(self.prefix)
        self.dropped += drop
        return not drop


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, within `timeout_s`, an address where nothing accepts a connection: ray.init itself retries a
    closed port for minutes. "auto" (the cluster a `ray start` left on this machine) is left to Ray."""
    import socket

    if address == "auto":
        return
    host_port = address.removeprefix("ray://").rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--address: {address!r} is not HOST:PORT; accepted: HOST:PORT (e.g. 10.0.0.5:6379), "
                          "ray://HOST:PORT (Ray Client) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"--address: nothing answers at {host}:{port} ({e.strerror or type(e).__name__}); "
                          "is the cluster up (`ray status` on its head) and the port forwarded?") from None


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy URLs MLflow's client opens itself
# where each scheme's password comes from instead of the URI, which clorch writes into the sweep's state
_MLFLOW_CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
PASSWORD_FROM_ENVIRONMENT = {"http": _MLFLOW_CREDENTIALS, "https": _MLFLOW_CREDENTIALS,
                             "postgresql": "PGPASSWORD or ~/.pgpass (0600; libpq reads both)"}


def check_tracking(uri: str) -> None:
    """Refuse a tracking URI that cannot work, before Ray starts: an unknown scheme, a password in the URI (it
    would be written to the sweep's state and logs), a SQLite file in a folder that does not exist, an HTTP
    server that does not answer within 5 s (MLflow's client would retry it for minutes) or refuses the
    credentials MLflow sends it, a database whose driver is missing or that refuses a connection."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    scheme, family = parsed.scheme, parsed.scheme.split("+")[0]
    if scheme and family not in TRACKING_SCHEMES:
        raise ConfigError(f"--tracking-uri: unknown scheme {scheme!r} in {uri}; accepted: "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local folder")
    if family in PASSWORD_FROM_ENVIRONMENT and _has_password(parsed):
        raise ConfigError(f"--tracking-uri: {redact_uri(uri)} carries a password, which clorch would write into "
                          f"the sweep's state and print; accepted: the URI without it, and the password in "
                          f"{PASSWORD_FROM_ENVIRONMENT[family]}")
    if scheme in ("sqlite", "file", ""):
        path = Path(uri.removeprefix("sqlite:///") if scheme == "sqlite" else parsed.path).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--tracking-uri: folder {path.parent} does not exist; accepted: a store in an "
                              "existing folder (e.g. sqlite:///mlflow.db here) or an MLflow server's http:// URI")
    elif scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # a server answered (one behind a proxy's authentication may refuse even /health)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"--tracking-uri: no MLflow server answers at {uri} ({reason}); start it "
                              "(`mlflow server --host 127.0.0.1`, see docs/cluster.md) or use sqlite:///mlflow.db") \
                from None
        check_credentials(uri)
    elif family in DATABASE_SCHEMES:
        check_database(uri)


def _has_password(parsed) -> bool:
    try:
        return bool(parsed.password)
    except ValueError:  # a netloc urlparse cannot split; SQLAlchemy or MLflow will say what is wrong
        return False


def redact_uri(uri: str) -> str:
    """`uri` with the password of its user part, if any, shown as ***."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if not _has_password(parsed):
        return uri
    user = parsed.netloc.rpartition("@")[0].partition(":")[0]
    return parsed._replace(netloc=f"{user}:***@{parsed.netloc.rpartition('@')[2]}").geturl()


def check_credentials(uri: str) -> None:
    """An MLflow server behind authentication (`mlflow server --app-name basic-auth`) answers /health to anyone:
    ask it for one experiment with the credentials MLflow's client will send (MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials) and refuse them here, not at the sweep's first write."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from mlflow.utils.credentials import read_mlflow_creds

    secure_credentials_file()
    # one bounded try: MLflow's default retries a failing server (a 5xx) for minutes
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return  # anything else is the store's own trouble, met (and queued) when the sweep logs
        user = read_mlflow_creds().username
        said = (f"refuses user {user!r} (wrong user or password)" if user and e.error_code == "UNAUTHENTICATED" else
                f"does not let user {user!r} read experiments" if user else
                "asks for a user and password, and none is set")
        raise ConfigError(f"--tracking-uri: the MLflow server at {uri} {said} ({e.error_code}); accepted: "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in this shell (or "
                          "~/.mlflow/credentials, 0600) naming a user of that server (docs/cluster.md)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def secure_credentials_file() -> None:
    """MLflow's client reads a password from ~/.mlflow/credentials: keep that file readable by its owner only."""
    path = Path("~/.mlflow/credentials").expanduser()
    if path.exists() and path.stat().st_mode & 0o077:
        try:
            path.chmod(0o600)
            log.info("MLflow's credentials file %s was readable by others; it is now 0600", path)
        except OSError as e:
            log.warning("MLflow's credentials file %s is readable by others and cannot be made private (%s)", path, e)


def check_database(uri: str, timeout_s: int = 5) -> None:
    """A database URI MLflow's client will open in this driver: its Python driver must import, and the server
    must accept a connection within `timeout_s` (MLflow retries a refused one for about 100 s, then fails with a
    traceback)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
    from sqlalchemy.pool import NullPool

    shown = redact_uri(uri)
    try:
        url = make_url(uri)
        dialect = url.get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 2 name, else 1.4's
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"--tracking-uri: {shown} is not a database URL SQLAlchemy knows ({_first_line(e)}); "
                          "accepted: e.g. postgresql+psycopg2://USER@HOST:5432/DATABASE") from None
    except ImportError as e:
        raise ConfigError(f"--tracking-uri: {url.drivername}:// needs the Python package {e.name!r}, which is not "
                          f"installed; accepted: install it, or name an installed driver, e.g. "
                          f"postgresql+psycopg2:// (pip install 'clorch[cluster]' installs psycopg2)") from None
    # every connection attempt bounded: a server that drops packets would otherwise hold the driver for minutes
    timeouts = {"postgresql": {"connect_timeout": timeout_s}, "mysql": {"connect_timeout": timeout_s}}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool,
                                      connect_args=timeouts.get(url.get_backend_name(), {}))
    try:
        with engine.connect():
            pass
    except DBAPIError as e:
        reason = " ".join(str(e.orig).split())[:240]
        raise ConfigError(f"--tracking-uri: the database at {shown} refuses a connection ({reason}); accepted: a "
                          "running server with that database and user (docs/cluster.md); PostgreSQL's password "
                          f"goes in {PASSWORD_FROM_ENVIRONMENT['postgresql']}") from None
    finally:
        engine.dispose()


def check_resources(resources: dict, local: bool) -> None:
    """Refuse a trial that the cluster can never place, before any trial waits for it forever. On a remote
    cluster an autoscaler may add nodes later, so a shortfall there is a warning."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    cpu_fix = "or --num-cpus N for a bigger local Ray"  # `accepted` is said on a local Ray only
    share = resources.get("gpus_per_trial")
    if resources["num_workers"] == 0:
        needs = [("tune.resources.cpus_per_trial", resources["cpus_per_trial"], node_cpus, "CPUs on one node",
                  f"at most {node_cpus:g} ({cpu_fix})")]
        if share:
            node_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
            needs.append(("tune.resources.gpus_per_trial", share, node_gpus, "GPUs on one node",
                          f"at most {node_gpus:g}, or no GPU (use_gpu false)"))
    else:
        total_cpus = sum(n.get("CPU", 0) for n in nodes)
        needs = [("tune.resources.cpus_per_worker", resources["cpus_per_worker"], node_cpus, "CPUs on one node",
                  f"at most {node_cpus:g} ({cpu_fix})"),
                 ("tune.resources.num_workers", resources["num_workers"] * resources["cpus_per_worker"], total_cpus,
                  "CPUs in the cluster (num_workers x cpus_per_worker)",
                  f"num_workers x cpus_per_worker at most {total_cpus:g} ({cpu_fix})")]
        if resources["use_gpu"]:
            needs.append(("tune.resources.use_gpu", resources["num_workers"] * (share or 1), total_gpus,
                          "GPUs in the cluster (gpus_per_trial, else 1, per worker)",
                          f"use_gpu false or auto, or at most {total_gpus:g} GPUs per trial"))
    for key, asked, has, what, accepted in needs:
        if asked > has:
            message = f"{key}: a trial needs {asked:g} {what}, and the cluster has {has:g}"
            if local:
                raise ConfigError(f"{message}; accepted: {accepted}")
            log.warning("%s; its trials wait until an autoscaler adds nodes that fit", message)


def secure_token_file(local: bool) -> None:
    """Keep Ray's token authentication on with a private token: Ray writes ~/.ray/auth_token readable by every
    user of the machine, so clorch creates it 0600 before a local Ray starts and tightens one it finds."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: Ray's token authentication is off, and anyone who reaches its ports "
                    "can run code as you; unset it to turn authentication back on")
        return
    if os.environ.get("RAY_AUTH_TOKEN"):
        return  # the token lives in the environment, no file
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.exists():
        if path.stat().st_mode & 0o077:
            try:
                path.chmod(0o600)
                log.info("Ray's token file %s was readable by others; it is now 0600", path)
            except OSError as e:
                log.warning("Ray's token file %s is readable by others and cannot be made private (%s)", path, e)
    elif local:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32))  # what Ray itself would generate, but private


def nodes_missing_storage(storage: Path, nodes: list[str]) -> list[str]:
    """Nodes on which a marker file written here under `storage` cannot be seen."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f".clorch-visible-{uuid.uuid4().hex}"
    marker.touch()
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(str(marker)) for node in nodes])
    finally:
        marker.unlink(missing_ok=True)
    return [node for node, ok in zip(nodes, seen) if not ok]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def cluster_gpus() -> int:
    """GPUs in the connected Ray cluster."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
