"""Shared fixtures: small run configs built from plain dicts, as a user's YAML would give them."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Caches of every test session go to a fresh folder, never to ~/.cache/clorch; set before any Ray starts so
# that trial processes inherit it.
os.environ["CLORCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="clorch-test-cache-")

from workloads.config import parse_run_config


def write_cifar(root, folder, files, label_key, per_file, num_classes, meta_name, names_key, cycle=False):
    """Random images in a CIFAR python-pickle release's layout; labels random, or 0, 1, 2, ... when `cycle`."""
    import pickle

    import numpy as np

    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in files:
        labels = np.arange(per_file) % num_classes if cycle else rng.integers(0, num_classes, per_file)
        batch = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 label_key: [int(v) for v in labels], b"batch_label": b"x"}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / meta_name).write_bytes(pickle.dumps({names_key: [f"c{i}".encode() for i in range(num_classes)]}))
    return base


def markdown_tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table of a markdown text (a `clorch report`), in order: (header cells, rows of cells)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|") and not line.startswith("|---"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif not line.startswith("|") and current:
            tables.append((current[0], current[1:]))
            current = []
    return tables


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray."""
    import ray

    from orchestrator.cluster import start_local

    if not ray.is_initialized():
        start_local(num_cpus=2)  # as `clorch sweep` starts it: listening on 127.0.0.1 only
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session, on 127.0.0.1 and a free port (tests/pg_server.py). Without
    PostgreSQL's programs the tests that need it fail, never skip: the README's test command installs them."""
    from pg_server import PostgresServer, ServerFailed

    try:
        server = PostgresServer()
    except ServerFailed as e:
        pytest.fail(str(e), pytrace=False)
    try:
        server.start()
    except ServerFailed as e:
        server.close()
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def pg_database(postgres, request) -> str:
    """A fresh, empty PostgreSQL database for this test: its SQLAlchemy URI."""
    return postgres.create_database(request.node.name)


@pytest.fixture
def mlflow_server(tmp_path):
    """Starts `mlflow server`s for this test: mlflow_server(backend_uri, **options) is a started MLflowServer
    on 127.0.0.1 (stop() and start() it again on the same port); every one is stopped at the test's end."""
    from pg_server import MLflowServer, ServerFailed

    started = []

    def start(backend_uri: str, **options) -> MLflowServer:
        server = MLflowServer(backend_uri, tmp_path / f"mlflow-server-{len(started)}", **options)
        started.append(server)
        try:
            return server.start()
        except ServerFailed as e:
            pytest.fail(str(e), pytrace=False)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def pg_mlflow_server(pg_database, mlflow_server):
    """An `mlflow server` (one worker) over a fresh PostgreSQL database, up and answering."""
    return mlflow_server(pg_database)


def toy2d_config(learner: dict, seed: int = 0):
    """The DKVB paper's toy protocol: 4 stages of 2 classes, Adam lr 1e-3, 1000 full-batch steps per stage."""
    return parse_run_config({
        "seed": seed,
        "data": {"source": "toy2d", "stages": [[0, 4], [1, 5], [2, 6], [3, 7]]},
        "learner": learner,
        "train": {"epochs": 1000, "batch_size": None, "optimizer": "adam", "lr": 1e-3},
    })


def digits_config(learner: dict, seed: int = 0, rehearsal: dict | None = None, **train):
    """digits in 5 stages of 2 classes (with a rehearsal memory when `rehearsal` is given)."""
    return parse_run_config({
        "seed": seed,
        "data": {"source": "digits", "classes_per_stage": 2},
        "learner": learner,
        "train": {"epochs": 20, "batch_size": 64, "optimizer": "sgd", "lr": 0.3, **train},
        "rehearsal": rehearsal or {},
    })


TOY_DKVB = {"name": "dkvb", "num_codebooks": 20, "num_keys": 20, "key_dim": 2, "key_init": "kmeans",
            "key_init_data": {"source": "unit_square", "num_samples": 10000}}
DIGITS_DKVB = {"name": "dkvb", "num_codebooks": 64, "num_keys": 256, "key_dim": 8, "key_init": "kmeans"}
