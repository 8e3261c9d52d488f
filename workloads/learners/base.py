"""The one learner interface every method implements; the stage loop lives in workloads.runner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from workloads.config import RehearsalConfig, TrainConfig, scaled_lr
from workloads.distributed import batch_mean_gradients
from workloads.rehearsal import RehearsalMemory


@dataclass
class LearnerContext:
    """What a learner learns about the run when it is built."""

    num_classes: int
    input_dim: int  # embedding dimension (frozen backbone) or flattened input size
    train: TrainConfig
    seed: int
    device: torch.device
    features: Any = None  # the run's FeatureStore (frozen backbone): other sources' embeddings, the key cache
    backbone: nn.Module | None = None  # only for learners that train it (trains_backbone = True)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)
    input_shape: tuple[int, ...] = ()  # one raw input's shape, e.g. (C, H, W) for images


class Learner(nn.Module):
    """Base class: subclasses build their model and override `observe` where the plain step does not fit.

    Call order, driven by the runner: setup (once, fresh runs only) -> for each stage: begin_stage,
    stage_inputs, observe per batch (samples of `memory` mixed in or joined, rehearsal.mode), end_stage -> predict for
    evaluation, on what eval_inputs made of every stage's evaluation inputs (once per run and split). `state` / `load_state` round-trip everything a resume needs, the memory included.
    Task-free (train.task_free): begin_online once, then stage_inputs and observe only; no stage is handed
    over, so stage_inputs must be a pure function of its inputs.
    """

    Options: ClassVar[type]
    trains_backbone: ClassVar[bool] = False  # True: observe() gets transformed raw inputs, not embeddings
    # Why the learner cannot train task-free (without begin_stage / end_stage), in a few words; "" = it can.
    needs_stage_boundaries: ClassVar[str] = ""
    # True: the learner's classifiers cover each stage's own classes only, so no blurry stream (data.blurry).
    stage_classes_only: ClassVar[bool] = False

    def __init__(self, options, ctx: LearnerContext):
        super().__init__()
        self.check(options, ctx.num_classes)
        self.options, self.ctx = options, ctx
        self.optimizer: torch.optim.Optimizer | None = None
        r = ctx.rehearsal
        # the runner fills it and mixes it into batches (workloads.rehearsal); learners may read it
        self.memory = RehearsalMemory(r.memory_size, r.selection, ctx.num_classes, r.distributed) \
            if r.memory_size else None

    @classmethod
    def check(cls, options, num_classes: int) -> None:
        """Refuse options that cannot work on a data set of `num_classes` classes, before anything is built
        (a sweep calls this on its driver, before Ray starts). Options alone were checked when parsed."""

    @property
    def setup_data(self) -> str:
        """Which unlabelled inputs `setup` receives: `first_stage` (the default: nothing from a later stage may
        reach a learner before its stage), `stream` (every stage's, transductive; only when a user names it),
        or `own_source` (the learner reads inputs of its own, outside the stream: `setup` gets none)."""
        return "first_stage"

    def setup(self, unlabelled: torch.Tensor | None) -> None:
        """Before the first stage of a fresh run: unsupervised preparation on the inputs `setup_data` names."""

    def begin_stage(self, stage) -> None:
        """Before training on a stage: make the optimiser the first time (or when parameters changed)."""
        if self.optimizer is None:
            self.optimizer = self.make_optimizer()

    def begin_online(self) -> None:
        """Task-free mode, once before the first batch of a run (or of a resumed run): make the optimiser."""
        if self.optimizer is None:
            self.optimizer = self.make_optimizer()

    def stage_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What observe() receives for this stage's training inputs (default: the inputs themselves)."""
        return x

    def eval_inputs(self, x: torch.Tensor):
        """What predict() receives for evaluation inputs, made once per run and split and sliced into batches
        (anything with len, slicing and .to(device)); default: the inputs themselves."""
        return x

    def begin_epochs(self, inputs: torch.Tensor | None) -> None:
        """Before a stage's epochs (runner.train_stage). `inputs` is what stage_inputs gave when every epoch's
        batches hold each of its rows exactly once and nothing else (no replay, one process), else None: what
        a learner counts per sample it may then count once per stage (end_epochs)."""

    def end_epochs(self, epochs: int) -> None:
        """After the epochs begun by begin_epochs, even when one failed: `epochs` of them ran in full."""

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step on a batch; returns the loss."""
        self.train()
        loss = self.loss(self(x), y)
        self.step(loss, len(y))
        return float(loss.detach())

    def end_stage(self, stage, is_last: bool) -> None:
        """After training on a stage (and after the memory took the stage's samples)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) features of inputs, for herding: the inputs themselves unless a learner has better."""
        return x.flatten(1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for evaluation."""
        self.eval()
        return self(x)

    # --- shared pieces ----------------------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.ctx.train.label_smoothing)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """`train.optimizer` over the trainable parameters, at `train.lr` unless `lr` is given (either scaled
        with the batch where train.lr_scale_batch says so)."""
        t = self.ctx.train
        params, lr = self.trainable_parameters(), scaled_lr(t, t.lr if lr is None else lr)
        # foreach: one fused call per step instead of a Python loop over tensors (the CPU default is the loop)
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay, foreach=True)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, foreach=True)
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def step(self, loss: torch.Tensor, batch: int) -> None:
        """Backward, average gradients over data-parallel processes (`batch`: this process's samples), clip, step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        batch_mean_gradients(self.trainable_parameters(), batch)
        if self.ctx.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.trainable_parameters(), self.ctx.train.grad_clip)
        self.optimizer.step()

    def state(self) -> dict[str, Any]:
        """Model tensors, optimiser state and the memory: everything a resume needs."""
        return {"model": self.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "memory": None if self.memory is None else self.memory.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""
        self.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer = self.make_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state(state["memory"])
