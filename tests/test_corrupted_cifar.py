"""search_spaces/corrupted_cifar10.yaml end to end on a fake CIFAR-10 release: every learner block of its sweep
runs the 5 corrupted domains (the real archive is not on this machine; see the file for the real setting)."""
from pathlib import Path

import pytest
import torch

from conftest import write_cifar
from orchestrator.cli import main
from orchestrator.config import load_experiment, with_values
from workloads.config import parse_run_config
from workloads.data.shifts import stage_shifts
from workloads.data.sources import load_source
from workloads.runner import prepare, run_stream

FILE = Path(__file__).parent.parent / "search_spaces" / "corrupted_cifar10.yaml"


@pytest.fixture
def fake_cifar10(tmp_path):
    pytest.importorskip("imagecorruptions")  # the dev extra installs it
    write_cifar(tmp_path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                b"labels", 50, 10, "batches.meta", b"label_names", cycle=True)  # 250 train, 50 test images
    return tmp_path


def tiny(root, extra=()) -> list[str]:
    return [f"data.root={root}", "train.epochs=1", f"cache_dir={root / 'cache'}", *extra]


def test_the_file_is_a_corrupted_cifar10_domain_stream_with_four_learners_and_a_memory_or_none():
    experiment = load_experiment(FILE)  # the placeholder root: parsed, never read
    base = experiment.base
    assert base.data.source == "cifar10" and base.data.download is False
    assert base.data.stream == "domain_incremental" and base.data.num_domains == 5
    assert (base.data.shift.name, base.data.shift.corruption) == ("corruption", "gaussian_noise")
    assert base.backbone.name == "small_cnn"
    axes = {a.key: a for a in experiment.axes}
    assert [b["name"] for b in axes["learner"].values] == ["dkvb", "linear", "mlp", "finetune"]
    assert axes["learner"].values[0]["key_init_data"] == "first_stage"  # keys on the clean first domain only
    assert axes["rehearsal.memory_size"].values == (0, 500)
    assert [s.severity for s in stage_shifts(5, base.data.shift, None)] == [0, 1, 2, 3, 4]


def test_every_learner_block_runs_the_five_corrupted_domains_end_to_end(fake_cifar10):
    experiment = load_experiment(FILE, tiny(fake_cifar10))
    cfg = experiment.base
    # the corruption changes the inputs: domain 0 is the clean image, domain 4 (severity 4) is not
    raw = load_source(cfg.data)
    shifts = stage_shifts(5, cfg.data.shift, None)
    shifted = [s(raw.x_test) for s in shifts]
    assert torch.equal(shifted[0], raw.x_test)
    assert shifted[4].shape == raw.x_test.shape and shifted[4].dtype == torch.uint8
    change = [float((x.float() - raw.x_test.float()).abs().mean()) for x in shifted]
    assert change[0] == 0 < change[1] < change[2] < change[3] < change[4], change  # measured: 0, 15, 23, 32, 44
    assert torch.equal(shifts[4](raw.x_test), shifted[4])  # seeded: every trial sees the same domains
    stream = prepare(cfg).stream  # and so do the frozen encoder's embeddings of the test sets
    assert len(stream) == 5 and stream.axis == "domain"
    assert not torch.allclose(stream[0].x_test, stream[4].x_test)

    axes = {a.key: a for a in experiment.axes}
    for block in axes["learner"].values:  # the sweep's 8 trials: every block without and with its memory
        for memory in axes["rehearsal.memory_size"].values:
            run = parse_run_config(with_values(experiment.base_raw, {"learner": block,
                                                                     "rehearsal.memory_size": memory}))
            held, states = [], []

            def seen(i, m, state):
                held.append(m.get("memory_size", 0))
                states.append(state)
            result = run_stream(run, on_stage_end=seen)
            R = result.test.accuracy_matrix
            assert len(R) == 5 and all(len(row) == 5 for row in R), (block["name"], memory)
            assert result.protocol["axis"] == "domain"
            assert 0 <= result.metrics["test/average_accuracy"] <= 1, (block["name"], memory, result.metrics)
            if memory == 0:
                assert held == [0] * 5, (block["name"], held)
            else:  # 500 exceeds the fake release: the memory keeps every training sample it has seen so far
                assert 0 < held[0] < held[1] < held[2] < held[3] < held[4] <= memory, (block["name"], held)
            if block["name"] == "finetune":  # fine-tuning trains the small_cnn itself, the others keep it frozen
                first, last = states[0]["learner"]["model"], states[-1]["learner"]["model"]
                assert not torch.equal(first["backbone.net.0.weight"], last["backbone.net.0.weight"])


def test_the_sweep_dry_run_accepts_the_file_with_a_data_root(fake_cifar10, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where storage and the MLflow store would default
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sweep", str(FILE), "--dry-run", "--num-cpus", "2", "--set", f"data.root={fake_cifar10}"]) == 0
    assert "8 trial(s)" in capsys.readouterr().out  # 4 learner blocks x 2 memory sizes
