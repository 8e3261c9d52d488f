"""MLP: a small fully connected network on the frozen embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from workloads.config import ConfigError
from workloads.learners.base import Learner


@dataclass
class MLPOptions:
    """Options of the MLP learner."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] | int = 128  # width of each hidden layer (one int = one hidden layer)

    def check(self) -> None:
        widths = [self.hidden] if isinstance(self.hidden, int) else self.hidden
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"learner.hidden: needs positive layer widths, got {self.hidden!r}")


class MLP(Learner):
    """ReLU layers of the `hidden` widths, then a linear classifier."""

    Options = MLPOptions

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        widths = [options.hidden] if isinstance(options.hidden, int) else list(options.hidden)
        layers, last = [], ctx.input_dim
        for w in widths:
            layers += [nn.Linear(last, w), nn.ReLU()]
            last = w
        self.net = nn.Sequential(*layers, nn.Linear(last, ctx.num_classes))

    def forward(self, x):
        return self.net(x)  # (B, D) -> (B, num_classes)

    def features(self, x):
        return self.net[:-1](x)  # the last hidden layer, (B, hidden[-1])
