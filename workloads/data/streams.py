"""Class-incremental streams: a labelled dataset cut into stages, each holding a disjoint set of classes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workloads.config import ConfigError


# Each purpose draws from its own seed, far apart, so that their random streams never correlate.
SEED_PURPOSES = {"batches": 0, "memory": 1 << 40, "finetune": 2 << 40}


def stage_seed(seed: int, stage: int, purpose: str = "batches") -> int:
    """Every stage draws from its own seeds, so a run resumed at a stage replays what an uninterrupted one does."""
    return seed * 1_000_003 + stage + SEED_PURPOSES[purpose]


@dataclass
class Stage:
    """One stage of a stream: its classes and their train / test samples (labels keep the source's ids)."""

    index: int
    classes: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class Stream:
    """An ordered list of stages over one label space; index or slice it like a list."""

    def __init__(self, stages: list[Stage], num_classes: int):
        self.stages = stages
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Stream(self.stages[i], self.num_classes)
        return self.stages[i]

    @property
    def classes(self) -> list[int]:
        """Every class of the stream, in stage order."""
        return [c for s in self.stages for c in s.classes]


def stage_classes(num_classes: int, classes_per_stage: int = 2, stages: list[list[int]] | None = None,
                  class_order_seed: int | None = None, present: set[int] | None = None) -> list[list[int]]:
    """The classes of each stage: `stages` as given, or the (optionally shuffled) class order cut in chunks."""
    present = set(range(num_classes)) if present is None else present
    if stages is not None:
        for i, stage in enumerate(stages):
            for c in stage:
                if c not in present:
                    raise ConfigError(f"data.stages[{i}]: class {c} has no samples in this source; "
                                      f"classes present: {sorted(present)}")
        return [list(s) for s in stages]
    order = sorted(present)
    if class_order_seed is not None:
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(class_order_seed))
        order = [order[i] for i in perm.tolist()]
    if classes_per_stage > len(order):
        raise ConfigError(f"data.classes_per_stage: {classes_per_stage} exceeds the {len(order)} classes present")
    return [order[i:i + classes_per_stage] for i in range(0, len(order), classes_per_stage)]


def make_stream(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                num_classes: int, classes: list[list[int]]) -> Stream:
    """Split train and test tensors into the stages whose classes `classes` lists."""
    stages = []
    for i, cls in enumerate(classes):
        c = torch.tensor(cls)
        tr = torch.isin(y_train, c)
        te = torch.isin(y_test, c)
        stages.append(Stage(i, tuple(cls), x_train[tr], y_train[tr], x_test[te], y_test[te]))
    return Stream(stages, num_classes)
