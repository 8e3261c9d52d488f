"""Run by tests/test_encode.py in its own process: a 2-node Ray cluster on this machine (a `head` and a `worker`
custom resource tell the nodes apart), `clorch cache FILE --address` on it, then what the trials that follow
see. Prints one JSON line: the outputs, the node names by id, the cache files' mtimes, the trials' encoded counts."""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

# every node on 127.0.0.1 (set before Ray is imported): Ray would otherwise take the machine's network
# address, and test traffic stays on loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray
from ray.cluster_utils import Cluster

from orchestrator.cli import main
from orchestrator.config import load_experiment
from workloads.runner import prepare


def clorch(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((cache / "features").glob("*.arrow"))}


if __name__ == "__main__":
    experiment = sys.argv[1]
    cache = Path(os.environ["CLORCH_CACHE_DIR"])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"worker": 1})
    cluster.wait_for_nodes()
    try:
        first = clorch("cache", experiment, "--address", cluster.address)
        names = {n["NodeID"]: ("head" if "head" in n["Resources"] else "worker") for n in ray.nodes() if n["Alive"]}
        after_tasks = mtimes(cache)
        again = clorch("cache", experiment, "--address", cluster.address)
        local = clorch("cache", experiment)  # in this process, without Ray: reads what the tasks wrote
        configs, _ = load_experiment(experiment, []).cache_configs()
        encoded = [prepare(c).context.features.encoded for c in configs]  # what each trial's store encodes
        print(json.dumps({"first": first, "again": again, "local": local, "nodes": names, "after_tasks": after_tasks,
                          "after_trials": mtimes(cache), "trials_encoded": encoded}))
    finally:
        ray.shutdown()
        cluster.shutdown()
