"""Encoding as Ray tasks: every embeddings file a sweep's trials read, encoded once, spread over the cluster's
nodes (one GPU per task where the cluster has GPUs, one CPU otherwise), before any trial starts.

The files are the trials' own: each task builds the run's backbone and feature store on its node and fills the
request through `FeatureStore.build` (same key, lock and atomic write), so a trial afterwards only maps them.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workloads.config import ConfigError, RunConfig, to_dict
from workloads.data.sources import DataError

log = logging.getLogger(__name__)


@dataclass
class Encoding:
    """One distinct embeddings file to build: its key, what it holds in words, and a config whose run reads it."""

    key: str
    what: str
    config: RunConfig
    # the driver's own store and request, for encoding in this process (a task rebuilds both on its node)
    store: object = field(default=None, repr=False, compare=False)
    request: object = field(default=None, repr=False, compare=False)


@dataclass
class Plan:
    """The embeddings files a set of run configs reads: those to encode, and how many verify in the cache."""

    todo: list[Encoding] = field(default_factory=list)
    cached: int = 0

    @property
    def total(self) -> int:
        return len(self.todo) + self.cached


def plan(configs: list[RunConfig]) -> Plan:
    """Every distinct embeddings file the runs of `configs` read (deduplicated by cache key: configs that differ
    only in their learner, or whose backbones have the same weights, share files), minus those already cached
    as this machine sees the cache. Builds each distinct backbone once, on the CPU, for its weights digest."""
    import torch

    from workloads.data.sources import load_source, source_shape
    from workloads.features import feature_requests, feature_store
    from workloads.learners import LEARNERS

    stores, sources = {}, {}
    seen: set[str] = set()
    out = Plan()
    for config in configs:
        if LEARNERS[config.learner.name].trains_backbone or config.backbone.name == "identity":
            continue  # trains its backbone (nothing cached), or inputs that are their own embeddings
        # the seed too: random weights (small_cnn) follow it, and the digest then tells equal weights apart
        which = json.dumps([to_dict(config.backbone), config.seed, source_shape(config.data), config.cache_dir],
                           sort_keys=True, default=str)
        if which not in stores:
            stores[which] = feature_store(config, torch.device("cpu"))
        data = None
        if config.data.stream == "domain_incremental":  # the domains' slices come from the labels
            data_key = json.dumps(to_dict(config.data), sort_keys=True, default=str)
            if data_key not in sources:
                sources[data_key] = load_source(config.data)
            data = sources[data_key]
        store = stores[which]
        for request in feature_requests(store, config, data):
            if request.key in seen:
                continue
            seen.add(request.key)
            if store.is_cached(request.key):
                out.cached += 1
            else:
                weights = store.backbone_id["weights"][:8]
                out.todo.append(Encoding(request.key, f"{request.what} through {config.backbone.name} "
                                                      f"(weights {weights})", config, store, request))
    return out


def _encode(config: RunConfig, key: str) -> dict:
    """The Ray task: build `key`'s embeddings file on this node, as a trial of `config` would; a report back."""
    import socket

    import ray
    import torch

    from workloads.features import encode_precision, feature_requests, feature_store

    started = time.perf_counter()
    node = ray.get_runtime_context().get_node_id()
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    # as many threads as CPUs reserved: Ray's default for a task is a single one
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    store = feature_store(config, device)
    request = next((r for r in feature_requests(store, config) if r.key == key), None)
    if request is None:
        raise RuntimeError(f"node {node} ({socket.gethostname()}) computes other cache keys for this config than "
                           "the driver: its backbone weights, library versions or data files differ; install the "
                           "same clorch, libraries and data on every node")
    encoded = store.build(request)
    what = f"{request.what} through {config.backbone.name} (weights {store.backbone_id['weights'][:8]})"
    return {"key": key, "what": what, "node_id": node, "node_ip": ray.util.get_node_ip_address(),
            "inputs": encoded, "encode_seconds": store.encode_seconds, "seconds": time.perf_counter() - started,
            "device": device.type, "precision": encode_precision(device), "path": str(store.path(key))}


def encode_here(todo: list[Encoding], on_done: Callable[[dict, int], None] | None = None) -> list[dict]:
    """Encode each of `todo` in this process, on the CPU, with the stores `plan` built; the same reports as
    `run_tasks` (the node: this process's Ray node, where Ray runs)."""
    import socket

    from workloads.features import encode_precision

    node, ip = "this-process", socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            node, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except ImportError:
        pass
    reports = []
    for e in todo:
        started, seconds_before = time.perf_counter(), e.store.encode_seconds
        inputs = e.store.build(e.request)
        reports.append({"key": e.key, "what": e.what, "node_id": node, "node_ip": ip, "inputs": inputs,
                        "encode_seconds": e.store.encode_seconds - seconds_before,
                        "seconds": time.perf_counter() - started, "device": e.store.device.type,
                        "precision": encode_precision(e.store.device), "path": str(e.store.path(e.key))})
        if on_done is not None:
            on_done(reports[-1], len(reports))
    return reports


def task_resources(tasks: int = 1, gpus_per_task: float = 1.0) -> dict:
    """What each of `tasks` encoding tasks reserves: `gpus_per_task` GPUs (and a CPU) where the cluster has GPUs;
    otherwise an equal share of the CPUs (at least one, at most the smallest node's), so that a few large
    files on many cores encode with many threads each."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_cpus": 1, "num_gpus": gpus_per_task}
    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not per_node:
        return {"num_cpus": 1}
    return {"num_cpus": max(1, min(int(min(per_node)), int(sum(per_node)) // max(tasks, 1)))}


def run_tasks(todo: list[Encoding], on_done: Callable[[dict, int], None] | None = None,
              gpus_per_task: float = 1.0) -> list[dict]:
    """Encode each of `todo` as one Ray task, spread over the nodes (SPREAD); `on_done(report, n)` as the n-th
    finishes. Returns the reports (key, what, node_id, node_ip, inputs, seconds, device, precision, path)."""
    import ray

    if not todo:
        return []
    task = ray.remote(_encode).options(**task_resources(len(todo), gpus_per_task), scheduling_strategy="SPREAD",
                                       max_retries=1)
    pending = [task.remote(e.config, e.key) for e in todo]
    reports = []
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                report = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                # a user's mistake (a data file, weights) stays one line; anything else keeps its cause
                if isinstance(e.cause, (ConfigError, DataError)):
                    raise e.cause from None
                raise RuntimeError(f"an encoding task failed: {e.cause or e}") from None
            reports.append(report)
            if on_done is not None:
                on_done(report, len(reports))
    finally:
        for ref in pending:  # after a failure, the others stop: the trials would not start anyway
            ray.cancel(ref)
    return reports


def report_line(report: dict, n: int, total: int) -> str:
    """One finished task in words: what, where, how many inputs, how long."""
    what = report["what"]
    done = (f"{report['inputs']} inputs encoded in {report['encode_seconds']:.1f}s" if report["inputs"]
            else "already there (another process built it)")
    return (f"[{n}/{total}] {what}, key {report['key'][:8]}: {done}, {report['seconds']:.1f}s in all, on node "
            f"{report['node_id'][:12]} ({report['node_ip']}, {report['device']} {report['precision']})")


def encode_configs(configs: list[RunConfig], say: Callable[[str], None], local: bool = False,
                   gpus_per_task: float = 1.0) -> list[dict]:
    """Encode, as Ray tasks on the connected Ray, every embeddings file `configs` read and the cache lacks;
    `say` gets a line for the plan, one per finished task, and a warning where this machine cannot see a
    file a task wrote (a cache folder the nodes do not share). Returns the tasks' reports.

    `local` (a Ray this process started, on this machine): without GPUs, the files are encoded in this process
    instead, with every core's threads: a task's fresh worker would cost more (seconds of imports) than it
    saves on one machine."""
    import ray

    p = plan(configs)
    if not p.total:
        return []
    if not p.todo:
        say(f"embeddings: all {p.total} file(s) the trials read are cached already")
        return []
    if local and not ray.cluster_resources().get("GPU", 0):
        say(f"embeddings: encoding {len(p.todo)} file(s) in this process (a local Ray without GPUs) before any "
            f"trial starts ({p.cached} of {p.total} cached already)")
        return encode_here(p.todo, lambda r, n: say(report_line(r, n, len(p.todo))))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    kind = "GPU" if "num_gpus" in task_resources(len(p.todo), gpus_per_task) else "CPU"
    say(f"embeddings: encoding {len(p.todo)} file(s) as {kind} Ray tasks over {nodes} node(s) before any trial "
        f"starts ({p.cached} of {p.total} cached already)")
    reports = run_tasks(p.todo, lambda r, n: say(report_line(r, n, len(p.todo))), gpus_per_task)
    unseen = [r for r in reports if not Path(r["path"]).exists()]
    if unseen:
        say(f"warning: {len(unseen)} embeddings file(s) written by the tasks are not visible here (e.g. "
            f"{unseen[0]['path']} from node {unseen[0]['node_id'][:12]}): the nodes do not share the cache "
            "folder, and trials elsewhere will encode again; point cache_dir or $CLORCH_CACHE_DIR at a shared "
            "folder on every node")
    return reports
