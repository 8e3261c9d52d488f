"""Run by tests/test_sweep.py in its own process: a Ray node that declares 1 GPU (none is there; Ray counts
what is declared) and a sweep of 4 trials with gpus_per_trial 0.25 on it. Prints, as JSON, the exit status,
the fewest GPUs Ray had available while the sweep ran, and each trial's gpu_ids and device."""
import json
import os
import sys
import threading
from pathlib import Path

# every node on 127.0.0.1 (set before Ray is imported): Ray would otherwise take the machine's network
# address, and test traffic stays on loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster

from orchestrator.cli import main

if __name__ == "__main__":
    experiment, storage, uri = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address)
    fewest, done = [1.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            fewest[0] = min(fewest[0], ray.available_resources().get("GPU", 0.0))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = main(["sweep", experiment, "--name", "share", "--address", cluster.address, "--storage", storage,
                     "--tracking-uri", uri])
    finally:
        done.set()
        watcher.join()
    trials = {}
    for result in (Path(storage) / "share").glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        trials[result.parent.name] = sorted({(line["gpu_ids"], line["device"]) for line in lines})
    print(json.dumps({"exit": code, "fewest_gpus": fewest[0], "trials": trials}))
    ray.shutdown()
    cluster.shutdown()
