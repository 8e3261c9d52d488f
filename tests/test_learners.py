"""Baselines through the same learner interface and stage loop."""
import pytest
import torch

from conftest import digits_config
from workloads.config import ConfigError, parse_run_config
from workloads.runner import run_stream


def test_finetune_trains_the_backbone_on_images():
    config = parse_run_config({"data": {"source": "digits"}, "backbone": {"name": "small_cnn"},
                               "learner": {"name": "finetune"},
                               "train": {"epochs": 15, "batch_size": 32, "optimizer": "adam", "lr": 1e-2}})
    states = []
    result = run_stream(config, on_stage_end=lambda i, m, s: states.append(s))
    assert sum(result.test.accuracy_matrix[i][i] for i in range(5)) / 5 > 0.75  # learns each stage...
    assert result.metrics["test/forgetting"] > 0.5  # ...and forgets the earlier ones: the naive baseline
    first, last = states[0]["learner"]["model"], states[-1]["learner"]["model"]
    conv = "backbone.net.0.weight"
    assert not torch.equal(first[conv], last[conv])  # the backbone itself moved between stages


def test_finetune_needs_a_backbone_with_parameters():
    with pytest.raises(ConfigError, match="finetune needs a backbone with parameters"):
        run_stream(digits_config({"name": "finetune"}))


@pytest.mark.parametrize("learner", [{"name": "linear"}, {"name": "mlp", "hidden": [64, 32]}])
def test_linear_and_mlp_learn_the_current_stage(learner):
    result = run_stream(digits_config(learner, epochs=10, lr=0.1))
    assert sum(result.test.accuracy_matrix[i][i] for i in range(5)) / 5 > 0.9
    assert result.metrics["test/average_accuracy"] < 0.5  # class-incremental: without a bottleneck they forget
