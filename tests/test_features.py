"""The feature cache and the key cache: encode once, learn keys once, survive corruption and concurrency."""
import logging
import multiprocessing as mp
import time

import pytest
import torch

from workloads.config import parse_run_config
from workloads.features import CacheCorrupt, read_features
from workloads.runner import run_stream


def cnn_config(cache_dir, learner=None, **train):
    """digits through a frozen random small CNN: a backbone whose embeddings are worth caching."""
    return parse_run_config({
        "seed": 0, "cache_dir": str(cache_dir),
        "data": {"source": "digits", "classes_per_stage": 5},
        "backbone": {"name": "small_cnn"},
        "learner": learner or {"name": "dkvb", "num_codebooks": 8, "num_keys": 32, "key_dim": 4},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.3, **train},
    })


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_two_runs_of_one_config_encode_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = run_stream(cnn_config(tmp_path))
    assert "encoded digits train: 1257 inputs" in messages(caplog)
    files = sorted((tmp_path / "features").glob("*.arrow"))
    assert len(files) == 2  # train and test
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.clear()
    second = run_stream(cnn_config(tmp_path))
    log = messages(caplog)
    assert "encoded" not in log and "digits train: 1257 embeddings served from the cache" in log
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert second.test.accuracy_matrix == first.test.accuracy_matrix


def test_runs_that_differ_only_in_learning_rate_learn_keys_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_stream(cnn_config(tmp_path, lr=0.3))
    run_stream(cnn_config(tmp_path, lr=1.0))
    log = messages(caplog)
    assert log.count("learning kmeans keys") == 1
    assert log.count("served from the cache") >= 3  # keys once, embeddings twice
    assert len(list((tmp_path / "keys").glob("*.pt"))) == 1
    run_stream(cnn_config(tmp_path, learner={"name": "dkvb", "num_codebooks": 8, "num_keys": 16, "key_dim": 4}))
    assert len(list((tmp_path / "keys").glob("*.pt"))) == 2  # another key config learns its own keys


def test_key_configs_with_the_same_codebooks_times_key_dim_do_not_share_keys(tmp_path):
    # 2 x 4 and 4 x 2 draw the same projection numbers from one seed; the second once crashed on the first's keys
    for codebooks, key_dim in ((2, 4), (4, 2)):
        config = {"cache_dir": str(tmp_path), "train": {"epochs": 1},
                  "learner": {"name": "dkvb", "num_codebooks": codebooks, "num_keys": 16, "key_dim": key_dim}}
        states = []
        run_stream(parse_run_config(config), on_stage_end=lambda i, m, s: states.append(s))
        assert states[0]["learner"]["model"]["bottleneck.keys"].shape == (codebooks, 16, key_dim)
    assert len(list((tmp_path / "keys").glob("*.pt"))) == 2


def test_keys_on_identity_inputs_are_cached_too(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = {"cache_dir": str(tmp_path), "learner": {"name": "dkvb", "num_codebooks": 4, "num_keys": 16},
              "train": {"epochs": 1}}
    run_stream(parse_run_config(config))
    run_stream(parse_run_config(config))
    assert messages(caplog).count("learning kmeans keys") == 1
    assert not list(tmp_path.glob("features/*.arrow"))  # identity embeddings are the inputs: nothing to store


def test_a_truncated_feature_file_is_detected_and_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = run_stream(cnn_config(tmp_path))
    victim = max((tmp_path / "features").glob("*.arrow"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CacheCorrupt):
        read_features(victim)
    caplog.clear()
    second = run_stream(cnn_config(tmp_path))
    assert "is corrupt" in messages(caplog) and "encoded digits train" in messages(caplog)
    read_features(victim)  # valid again
    assert second.test.accuracy_matrix == first.test.accuracy_matrix


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    run_stream(cnn_config(tmp_path))
    victim = max((tmp_path / "features").glob("*.arrow"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the embedding buffer
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheCorrupt, match="checksum"):
        read_features(victim)


def test_edited_metadata_fails_the_checksum_and_the_file_is_rebuilt(tmp_path, caplog):
    import json

    import pyarrow as pa

    first = run_stream(cnn_config(tmp_path))
    victim = max((tmp_path / "features").glob("*.arrow"), key=lambda p: p.stat().st_size)
    table = pa.ipc.open_file(pa.BufferReader(victim.read_bytes())).read_all()  # in memory: the file is rewritten
    info = json.loads(table.schema.metadata[b"clorch"])
    info["num_classes"] = 1000  # the columns untouched: only what the file says about them changes
    table = table.replace_schema_metadata({"clorch": json.dumps(info)})
    with open(victim, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(CacheCorrupt, match="checksum"):
        read_features(victim)
    caplog.set_level(logging.INFO)
    second = run_stream(cnn_config(tmp_path))
    assert "is corrupt" in messages(caplog) and read_features(victim)[2]["num_classes"] == 10
    assert second.test.accuracy_matrix == first.test.accuracy_matrix


def test_a_corrupt_key_file_is_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_stream(cnn_config(tmp_path))
    (key_file,) = (tmp_path / "keys").glob("*.pt")
    key_file.write_bytes(b"not a checkpoint")
    run_stream(cnn_config(tmp_path))
    assert "key cache" in messages(caplog) and messages(caplog).count("learning kmeans keys") == 2


def _encode_in_child(cache_dir: str, barrier, results) -> None:
    import workloads.features as features
    from workloads.backbones import build_backbone
    from workloads.features import FeatureStore

    slow = features.encode_with_progress

    def slow_encode(*args, **kwargs):  # widen the window in which both processes want the same file
        time.sleep(1.0)
        return slow(*args, **kwargs)

    features.encode_with_progress = slow_encode
    config = cnn_config(cache_dir)
    torch.manual_seed(0)
    store = FeatureStore(build_backbone(config.backbone, (1, 8, 8)), "small_cnn", config.cache_dir,
                         torch.device("cpu"))
    barrier.wait()
    store.labelled(config.data)
    results.put(store.encoded)


@pytest.mark.slow
def test_two_processes_asking_for_one_cache_encode_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_encode_in_child, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    encoded = sorted(results.get(timeout=5) for _ in procs)
    assert encoded[0] == 0 and encoded[1] > 0  # one process encoded both splits, the other read them
    assert len(list((tmp_path / "features").glob("*.arrow"))) == 2


def test_a_run_maps_each_embeddings_file_once_as_one_record_batch(tmp_path, monkeypatch):
    import pyarrow as pa

    from workloads import features

    reads = []
    real = features.read_features

    def mapped(path):  # a miss (no file yet) maps nothing: only reads that return count
        out = real(path)
        reads.append(path.name)
        return out

    monkeypatch.setattr(features, "read_features", mapped)
    run_stream(cnn_config(tmp_path, {"name": "linear"}, epochs=1))  # cold cache: encode, then map
    run_stream(cnn_config(tmp_path, {"name": "linear"}, epochs=1))  # warm cache
    files = sorted(p.name for p in (tmp_path / "features").glob("*.arrow"))
    assert len(files) == 2 and sorted(reads) == sorted(files * 2)  # each run maps train and test once, not per stage
    for name in files:  # one batch: the embedding column is the mapped buffer itself, never a concatenated copy
        assert pa.ipc.open_file(pa.memory_map(str(tmp_path / "features" / name))).num_record_batches == 1
