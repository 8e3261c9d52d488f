"""Fine-tuning: the backbone and a linear head, all trained on each stage in turn."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from workloads.config import ConfigError
from workloads.learners.base import Learner


@dataclass
class FinetuneOptions:
    """Options of the fine-tuning learner."""

    name: Literal["finetune"] = "finetune"


class Finetune(Learner):
    """Backbone + linear head, every parameter trained (the naive upper bound on plasticity)."""

    Options = FinetuneOptions
    trains_backbone = True

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        if ctx.backbone is None or not any(True for _ in ctx.backbone.parameters()):
            raise ConfigError("learner.name: finetune needs a backbone with parameters (e.g. backbone.name: "
                              "small_cnn); the identity backbone has none")
        self.backbone = ctx.backbone
        self.head = nn.Linear(ctx.backbone.output_dim, ctx.num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))  # (B, ...) -> (B, num_classes)

    def features(self, x):
        return self.backbone(x)  # (B, output_dim)
