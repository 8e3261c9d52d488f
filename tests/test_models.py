"""The final model as safetensors + JSON (orchestrator.models): loads without unpickling, refuses tampering."""
import contextlib
import json
import pickle

import pytest
import torch

from orchestrator.models import DESCRIPTION, WEIGHTS, ModelFormatError, load_model, save_model
from conftest import DIGITS_DKVB, digits_config
from workloads.config import parse_run_config
from workloads.runner import prepare, rebuild_learner, run_stream


def final_state(config):
    states = []
    run_stream(config, on_stage_end=lambda i, m, s: states.append(s))
    return states[-1]


@contextlib.contextmanager
def unpickling_refused():
    """Within: every way of unpickling (pickle's functions and Unpickler, torch.load) raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            patch.setattr(module, name, refuse)
        yield


def test_a_dkvb_round_trips_without_unpickling_anything(tmp_path):
    config = digits_config({**DIGITS_DKVB, "num_keys": 64}, epochs=2)
    state = final_state(config)
    folder = save_model(tmp_path / "model", config, state)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["MLmodel", WEIGHTS, DESCRIPTION])
    with unpickling_refused():
        loaded = load_model(folder)
    expected = rebuild_learner(config, state)
    x = prepare(config).stream[0].x_test
    assert torch.equal(loaded.predict(x), expected.predict(x))
    assert loaded.memory is None and loaded.optimizer is None


def test_a_dytox_keeps_its_task_tokens(tmp_path):
    config = parse_run_config({"preset": "dytox_tiny", "data": {"stages": [[0, 1], [2, 3]]},
                               "learner": {"name": "dytox", "depth": 1, "finetune_epochs": 1},
                               "train": {"epochs": 1}})
    state = final_state(config)
    folder = save_model(tmp_path / "model", config, state)
    with unpickling_refused():
        loaded = load_model(folder)
    assert len(loaded.task_tokens) == 2 and loaded.stage_classes == [[0, 1], [2, 3]]
    x = prepare(config).stream[1].x_test[:8]
    assert torch.equal(loaded.predict(x), rebuild_learner(config, state).predict(x))


def test_changed_weights_or_another_format_are_refused(tmp_path):
    config = digits_config({**DIGITS_DKVB, "num_keys": 32}, epochs=1)
    folder = save_model(tmp_path / "model", config, final_state(config))
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-5] ^= 0xFF  # a byte of the last tensor's data: the file still parses, one number is wrong
    (folder / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(ModelFormatError, match="does not match the sha256"):
        load_model(folder)
    weights[-5] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(weights))
    description = json.loads((folder / DESCRIPTION).read_text())
    (folder / DESCRIPTION).write_text(json.dumps({**description, "version": 99}))
    with pytest.raises(ModelFormatError, match="version 99"):
        load_model(folder)
    with pytest.raises(ModelFormatError, match="not a clorch model"):
        load_model(tmp_path)
