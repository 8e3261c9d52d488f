"""Linear probe: one linear layer on the frozen embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from workloads.learners.base import Learner


@dataclass
class LinearOptions:
    """Options of the linear probe."""

    name: Literal["linear"] = "linear"


class LinearProbe(Learner):
    """A linear classifier over the embedding, trained on each stage in turn."""

    Options = LinearOptions

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.fc = nn.Linear(ctx.input_dim, ctx.num_classes)

    def forward(self, x):
        return self.fc(x)  # (B, D) -> (B, num_classes)
