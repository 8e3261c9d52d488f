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


def connect(target: Target, num_cpus: int | None = None) -> None:
    """Start or join Ray; a multi-node cluster needs storage that every node sees."""
    import ray

    if target.address:
        check_reachable(target.address)
    if not ray.is_initialized():
        secure_token_file(local=not target.address)
        if target.address:
            try:
                ray.init(address=target.address, log_to_driver=False)
            except (ConnectionError, ray.exceptions.AuthenticationError, ray.exceptions.RaySystemError) as e:
                raise ConfigError(f"--address: could not join the Ray cluster at {target.address} ({_first_line(e)}); "
                                  "check the address, and on a cluster with token authentication set "
                                  "RAY_AUTH_MODE=token (and its token) in this shell") from None
        else:
            start_local(num_cpus)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        missing = nodes_missing_storage(target.storage, nodes)
        if missing:
            raise ConfigError(f"--storage: {target.storage} is not visible from {len(missing)} of the cluster's "
                              f"{len(nodes)} nodes; pass a folder that every node mounts (NFS, a shared disk)")


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


def check_tracking(uri: str) -> None:
    """Refuse a tracking URI that cannot work, before Ray starts: an unknown scheme, a SQLite file in a folder
    that does not exist, an HTTP server that does not answer within 5 s (MLflow's client would retry it for
    minutes). Database servers are left to MLflow."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"--tracking-uri: unknown scheme {scheme!r} in {uri}; accepted: "
                          f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} or a local folder")
    if scheme in ("sqlite", "file", ""):
        path = Path(uri.removeprefix("sqlite:///") if scheme == "sqlite" else urlparse(uri).path).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--tracking-uri: folder {path.parent} does not exist; accepted: a store in an "
                              "existing folder (e.g. sqlite:///mlflow.db here) or an MLflow server's http:// URI")
    elif scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # a server answered (one behind authentication may refuse even /health)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"--tracking-uri: no MLflow server answers at {uri} ({reason}); start it "
                              "(`mlflow server --host 127.0.0.1`, see docs/cluster.md) or use sqlite:///mlflow.db") \
                from None


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
