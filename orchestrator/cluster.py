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
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return Target(address, storage_path, uri)


def connect(target: Target, num_cpus: int | None = None) -> None:
    """Start or join Ray; a multi-node cluster needs storage that every node sees."""
    import ray

    if not ray.is_initialized():
        if target.address:
            try:
                ray.init(address=target.address, log_to_driver=False)
            except (ConnectionError, ray.exceptions.AuthenticationError, ray.exceptions.RaySystemError) as e:
                raise ConfigError(f"--address: could not join the Ray cluster at {target.address} ({_first_line(e)}); "
                                  "check the address, and on a cluster with token authentication set "
                                  "RAY_AUTH_MODE=token (and its token) in this shell") from None
        else:
            # address="local": always a new instance, never a cluster some `ray start` left on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        missing = nodes_missing_storage(target.storage, nodes)
        if missing:
            raise ConfigError(f"--storage: {target.storage} is not visible from {len(missing)} of the cluster's "
                              f"{len(nodes)} nodes; pass a folder that every node mounts (NFS, a shared disk)")


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
