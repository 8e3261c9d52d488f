"""Metric definitions checked on hand-made matrices and predictions."""
import pytest
import torch

from workloads import metrics

R = [[0.9, 0.0, 0.0],
     [0.6, 0.8, 0.0],
     [0.3, 0.7, 1.0]]


def test_forgetting_is_the_mean_drop_from_the_best_earlier_accuracy():
    # stage 0: best 0.9 (after stage 0) -> 0.3; stage 1: best 0.8 -> 0.7
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)
    assert metrics.forgetting([[0.5]]) == 0.0


def test_backward_transfer_compares_final_with_just_trained_accuracy():
    assert metrics.backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)


def test_stage_and_class_accuracies_come_from_raw_predictions():
    target = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 2, 2])
    assert metrics.stage_accuracies(pred, target, [[0, 1], [2]]) == pytest.approx([3 / 6, 1.0])
    assert metrics.class_accuracies(pred, target, 4) == pytest.approx([0.5, 0.5, 1.0, None])


def test_average_accuracy_is_class_balanced_over_seen_classes():
    # class 0 has many samples and is right, class 1 has few and is wrong: balanced accuracy is 0.5
    stages = [[0, 1], [2, 3]]
    A = [[1.0, 0.0, 0.0, 0.0],
         [1.0, 0.0, 1.0, 0.5]]
    assert metrics.accuracy_after_each_stage(A, stages) == pytest.approx([0.5, 2.5 / 4])
    assert metrics.average_accuracy(A, stages) == pytest.approx(2.5 / 4)
    assert metrics.average_incremental_accuracy(A, stages) == pytest.approx((0.5 + 2.5 / 4) / 2)
