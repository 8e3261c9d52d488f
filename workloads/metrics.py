"""Continual-learning metrics, all derived from raw predictions or from the accuracy matrix they give.

Notation: T stages; R[i][j] = accuracy on stage j's test samples (class-incremental: the test samples of
stage j's classes; domain-incremental: the test data under domain j's shift) after training stage i
(0-based, a full T x T matrix, so entries with j > i show accuracy on classes not trained yet);
A[i][c] = accuracy on class c's test samples after training stage i.

Every metric exists once per evaluation split and is named `<split>/<metric>`: `val/` for the held-out part
of the training data (what models are selected on) and `test/` for the test data (what a paper reports).
"""
from __future__ import annotations

import torch


def stage_accuracies(pred: torch.Tensor, target: torch.Tensor, stages: list[list[int]]) -> list[float]:
    """One row of R: for each stage j, the fraction of test samples of stage j's classes predicted right."""
    row = []
    for classes in stages:
        mask = torch.isin(target, torch.tensor(classes))
        row.append(float((pred[mask] == target[mask]).float().mean()) if mask.any() else float("nan"))
    return row


def class_accuracies(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """One row of A: per-class accuracy (None for a class without test samples)."""
    correct = torch.bincount(target[pred == target], minlength=num_classes).float()
    total = torch.bincount(target, minlength=num_classes).float()
    return [float(c / t) if t > 0 else None for c, t in zip(correct, total)]


def seen_class_accuracy(class_acc: list[float | None], seen: list[int]) -> float:
    """Class-balanced accuracy over the seen classes: the mean of their per-class accuracies."""
    values = [class_acc[c] for c in seen if class_acc[c] is not None]
    return sum(values) / len(values) if values else float("nan")


def accuracy_after_each_stage(class_matrix: list[list[float | None]], stages: list[list[int]]) -> list[float]:
    """a_i: class-balanced accuracy over the classes of stages 0..i, after training stage i."""
    seen: list[int] = []
    out = []
    for i, row in enumerate(class_matrix):
        seen += [c for c in stages[i] if c not in seen]  # domain stages share classes: each counts once
        out.append(seen_class_accuracy(row, seen))
    return out


def average_accuracy(class_matrix: list[list[float | None]], stages: list[list[int]]) -> float:
    """a_{T-1}: after the last stage, the mean per-class accuracy over every class seen."""
    return accuracy_after_each_stage(class_matrix, stages)[-1]


def average_incremental_accuracy(class_matrix: list[list[float | None]], stages: list[list[int]]) -> float:
    """(1/T) sum_i a_i (Rebuffi et al., iCaRL): the accuracy on seen classes averaged over all stages."""
    accs = accuracy_after_each_stage(class_matrix, stages)
    return sum(accs) / len(accs)


def forgetting(R: list[list[float]]) -> float:
    """Chaudhry et al. (2018): (1/(T-1)) sum_{j<T-1} max_{i in [j, T-2]} (R[i][j] - R[T-1][j]); 0 when T = 1."""
    T = len(R)
    if T < 2:
        return 0.0
    drops = [max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def backward_transfer(R: list[list[float]]) -> float:
    """Lopez-Paz & Ranzato (2017): (1/(T-1)) sum_{j<T-1} (R[T-1][j] - R[j][j]); negative means forgetting."""
    T = len(R)
    if T < 2:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


SPLITS = ("val", "test")

# Which way is better, for every metric a run reports per split (selection, ranking, reports).
DIRECTIONS = {"average_accuracy": "max", "average_incremental_accuracy": "max", "accuracy_on_seen_classes": "max",
              "forgetting": "min", "bwt": "max"}


def split_of(name: str) -> str | None:
    """'val/average_accuracy' -> 'val'; None for a name without a split prefix."""
    head, _, rest = name.partition("/")
    return head if rest and head in SPLITS else None


def direction(name: str) -> str | None:
    """'max' or 'min' for a (split-prefixed) metric name; None if unknown."""
    base = name.partition("/")[2] if split_of(name) else name
    return DIRECTIONS.get(base) or ("min" if base == "loss" else None)


def summarise(R: list[list[float]], class_matrix: list[list[float | None]], stages: list[list[int]]) -> dict:
    """Every metric above for a (possibly partial) run: rows 0..i of R and A after stage i."""
    done = stages[: len(R)]
    return {
        "average_accuracy": average_accuracy(class_matrix, done),
        "average_incremental_accuracy": average_incremental_accuracy(class_matrix, done),
        "forgetting": forgetting([row[: len(R)] for row in R]),
        "bwt": backward_transfer([row[: len(R)] for row in R]),
    }
