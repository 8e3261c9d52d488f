"""Run by tests/test_sweep.py in its own process: a 2-node Ray cluster on this machine, a sweep across it,
logging to an MLflow server on 127.0.0.1. Prints the node of each trial and the MLflow run count as JSON."""
import json
import os
import sys
from pathlib import Path

# every node on 127.0.0.1 (set before Ray is imported): Ray would otherwise take the machine's network
# address, and test traffic stays on loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from ray.cluster_utils import Cluster

from orchestrator.cli import main

if __name__ == "__main__":
    experiment, storage, uri = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    code = main(["sweep", experiment, "--name", "two", "--address", cluster.address, "--storage", storage,
                 "--tracking-uri", uri])
    nodes = {}
    for result in (Path(storage) / "two").glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        nodes[result.parent.name] = sorted({line["node_id"] for line in lines})
    print(json.dumps({"exit": code, "nodes": nodes}))
    cluster.shutdown()
