"""The learner registry: one name per method, one way to build it (`build_learner`).

To add a learner: write `workloads/learners/<name>.py` with an options dataclass (its `name` field a
Literal of the new name) and a `Learner` subclass setting `Options`, then list it in LEARNERS below.
"""
from __future__ import annotations

from workloads.learners.base import Learner, LearnerContext
from workloads.learners.dkvb import DKVB
from workloads.learners.dytox import DyTox
from workloads.learners.finetune import Finetune
from workloads.learners.linear import LinearProbe
from workloads.learners.mlp import MLP

LEARNERS: dict[str, type[Learner]] = {
    "dkvb": DKVB,
    "linear": LinearProbe,
    "mlp": MLP,
    "finetune": Finetune,
    "dytox": DyTox,
}


def build_learner(options, ctx: LearnerContext) -> Learner:
    """The learner that `options.name` names, built for the run described by `ctx`."""
    return LEARNERS[options.name](options, ctx)


__all__ = ["LEARNERS", "Learner", "LearnerContext", "build_learner"]
