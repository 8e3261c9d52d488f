"""The one stage loop: train a learner on each stage in turn, evaluate on every stage, fill the accuracy matrix.

`run_stream(config, resume_state, on_stage_end)` is what both `clorch run` and the Ray trials call; nothing
else loops over stages.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from workloads import metrics
from workloads.backbones import build_backbone
from workloads.config import RunConfig, to_dict
from workloads.data.sources import load_source, source_shape
from workloads.features import FeatureStore
from workloads.data.streams import Stream, make_stream, stage_classes, stage_seed
from workloads.learners import LEARNERS, Learner, LearnerContext, build_learner
from workloads.distributed import shard_batches, sum_across, world
from workloads.progress import ProgressLog
from workloads.rehearsal import Replay

log = logging.getLogger(__name__)

StageCallback = Callable[[int, dict, dict], None]


@dataclass
class RunResult:
    """What a finished run hands back: the raw matrices, the derived metrics, per-stage timings."""

    config: dict
    stages: list[list[int]]
    accuracy_matrix: list[list[float]]  # R[i][j]
    class_accuracy_matrix: list[list[float | None]]  # A[i][c]
    stage_seconds: list[float]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy_matrix": self.accuracy_matrix, **self.metrics,
                "accuracy_on_seen_classes": metrics.accuracy_after_each_stage(self.class_accuracy_matrix, self.stages),
                "class_accuracy_matrix": self.class_accuracy_matrix, "stages": self.stages,
                "stage_seconds": self.stage_seconds, "config": self.config}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA where present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class PreparedStream:
    """A stream ready for a learner: inputs already through the frozen backbone (or transformed only)."""

    stream: Stream
    context: LearnerContext
    source_shape: tuple[int, ...]  # one raw input's shape, before the backbone's transform


def prepare(config: RunConfig) -> PreparedStream:
    """Build the backbone, get the inputs (embeddings from the feature cache, or transformed inputs when the
    learner trains the backbone) and cut the stream into stages."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # random backbone weights (small_cnn) follow the seed
    shape = source_shape(config.data)
    backbone = build_backbone(config.backbone, shape)
    store = None
    if LEARNERS[config.learner.name].trains_backbone:
        data = load_source(config.data)
        x_train, y_train = backbone.transform(data.x_train), data.y_train
        x_test, y_test = backbone.transform(data.x_test), data.y_test
        num_classes, train_key = data.num_classes, None
    else:
        backbone.requires_grad_(False)
        store = FeatureStore(backbone, config.backbone.name, config.cache_dir, device)
        f = store.labelled(config.data)
        x_train, y_train, x_test, y_test = f.x_train, f.y_train, f.x_test, f.y_test
        num_classes, train_key = f.num_classes, f.train_key
    present = set(torch.unique(torch.cat([y_train, y_test])).tolist())
    classes = stage_classes(num_classes, config.data.classes_per_stage, config.data.stages,
                            config.data.class_order_seed, present)
    stream = make_stream(x_train, y_train, x_test, y_test, num_classes, classes)
    ctx = LearnerContext(num_classes=num_classes, input_dim=backbone.output_dim, train=config.train,
                         seed=config.seed, device=device, features=store, train_key=train_key,
                         backbone=None if store else backbone, rehearsal=config.rehearsal,
                         input_shape=tuple(x_train.shape[1:]))
    return PreparedStream(stream, ctx, tuple(shape))


def rebuild_learner(config: RunConfig, state: dict) -> Learner:
    """A run's learner from its stage state (`run_stream`'s on_stage_end), on the CPU, without data."""
    shape = state["learner_shape"]
    backbone = None
    if LEARNERS[config.learner.name].trains_backbone:
        backbone = build_backbone(config.backbone, tuple(shape["source_shape"]))
    ctx = LearnerContext(num_classes=shape["num_classes"], input_dim=shape["input_dim"], train=config.train,
                         seed=config.seed, device=torch.device("cpu"), backbone=backbone,
                         rehearsal=config.rehearsal, input_shape=tuple(shape.get("input_shape", ())))
    learner = build_learner(config.learner, ctx)
    learner.load_state(state["learner"])
    return learner


def precompute(config: RunConfig) -> str:
    """Fill the feature cache (and, for a DKVB, the key cache) that `config` reads; returns a one-line report."""
    prepared = prepare(config)
    ctx = prepared.context
    if ctx.features is None:
        return f"{config.learner.name} trains its backbone: nothing to cache"
    encoded = ctx.features.encoded
    parts = [f"{config.data.source} through {config.backbone.name}: "
             + (f"encoded {encoded} inputs" if encoded else "embeddings already cached")]
    if config.learner.name == "dkvb":
        learner = build_learner(config.learner, ctx)
        learner.setup(torch.cat([s.x_train for s in prepared.stream]))
        o = config.learner
        parts.append(f"keys ready ({o.num_codebooks} x {o.num_keys}, {o.key_init})")
    return "; ".join(parts) + f"; cache {ctx.features.cache_dir}"


def evaluate(learner, stream: Stream, batch_size: int) -> tuple[list[float], list[float | None]]:
    """Predict every stage's test set; return a row of R and a row of A."""
    x = torch.cat([s.x_test for s in stream])
    y = torch.cat([s.y_test for s in stream])
    device = learner.ctx.device
    preds = torch.cat([learner.predict(x[i:i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, len(x), batch_size)])
    return (metrics.stage_accuracies(preds, y, [list(s.classes) for s in stream]),
            metrics.class_accuracies(preds, y, stream.num_classes))


def train_stage(learner, stage, config: RunConfig, total_stages: int, replay: Replay | None = None) -> float:
    """Run `train.epochs` passes over the stage's training data, replayed samples mixed into each batch;
    returns the last epoch's mean loss."""
    t = config.train
    device = learner.ctx.device
    inputs = learner.stage_inputs(stage.x_train.to(device))
    labels = stage.y_train.to(device)
    n = len(labels)
    batch = n if t.batch_size is None else min(t.batch_size, n)
    gen = torch.Generator().manual_seed(stage_seed(config.seed, stage.index))
    progress = ProgressLog(log)
    mean_loss = float("nan")
    rank, size = world()  # data-parallel processes each take every size-th sample of a batch (and of replay)
    for epoch in range(t.epochs):
        total = torch.zeros(2)  # loss summed over samples, samples
        for full, mine in shard_batches(n, batch, gen, device):
            x, y = inputs[mine], labels[mine]
            if replay is not None:
                drawn = replay.draw(len(full), gen)
                if drawn is not None:
                    x, y = torch.cat([x, drawn[0][rank::size]]), torch.cat([y, drawn[1][rank::size]])
                if epoch == 0 and replay.online:  # every process offers the full batch: one global memory
                    cpu = full.cpu()
                    replay.offer(stage.x_train[cpu], inputs[full], stage.y_train[cpu], gen)
            total += torch.tensor([learner.observe(x, y) * len(y), len(y)])
        sum_across(total)
        mean_loss = float(total[0] / total[1].clamp(min=1))
        progress("stage %d/%d epoch %d/%d loss %.4f", stage.index + 1, total_stages, epoch + 1, t.epochs, mean_loss,
                 last=epoch + 1 == t.epochs)
    return mean_loss


@torch.no_grad()
def batched_features(learner, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`learner.features` over `x` in evaluation mode, batch by batch, on the CPU."""
    learner.eval()
    device = learner.ctx.device
    return torch.cat([learner.features(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def run_stream(config: RunConfig, resume_state: dict | None = None,
               on_stage_end: StageCallback | None = None, prepared: PreparedStream | None = None) -> RunResult:
    """Train `config.learner` on the stream stage by stage; resume after the stages `resume_state` holds.

    After each stage, `on_stage_end(stage_index, stage_metrics, state)` receives the metrics so far and the
    full state to resume from (learner tensors and optimiser, the matrices so far).
    """
    prepared = prepared or prepare(config)
    stream, ctx = prepared.stream, prepared.context
    learner = build_learner(config.learner, ctx).to(ctx.device)
    stages = [list(s.classes) for s in stream]
    R: list[list[float]] = []
    A: list[list[float | None]] = []
    seconds: list[float] = []
    first = 0
    if resume_state is not None:
        learner.load_state(resume_state["learner"])
        R, A, seconds = copy.deepcopy([resume_state[k] for k in ("accuracy_matrix", "class_accuracy_matrix",
                                                                 "stage_seconds")])
        first = resume_state["next_stage"]
        log.info("resuming at stage %d/%d", first + 1, len(stream))
    else:
        torch.manual_seed(config.seed)
        learner.setup(torch.cat([s.x_train for s in stream]).to(ctx.device))
    memory = learner.memory
    for stage in stream[first:]:
        t0 = time.perf_counter()
        torch.manual_seed(stage_seed(config.seed, stage.index))
        learner.begin_stage(stage)
        replay = None
        if memory is not None:
            memory_gen = torch.Generator().manual_seed(stage_seed(config.seed, stage.index, "memory"))
            memory.begin_stage(list(stage.classes), memory_gen)
            replay = Replay(memory, learner.stage_inputs, config.rehearsal.replay_ratio, ctx.device)
        loss = train_stage(learner, stage, config, len(stream), replay)
        if memory is not None:
            memory.end_stage(stage.x_train, stage.y_train, list(stage.classes),
                             lambda x: batched_features(learner, x, config.train.eval_batch_size), memory_gen)
            memory.check_global()
        learner.end_stage(stage, is_last=stage.index == len(stream) - 1)
        row, class_row = evaluate(learner, stream, config.train.eval_batch_size)
        R.append(row)
        A.append(class_row)
        seconds.append(time.perf_counter() - t0)
        stage_metrics = {"stage": stage.index, "num_stages": len(stream), "classes": list(stage.classes),
                         "loss": loss,
                         "accuracy_on_seen_classes": metrics.accuracy_after_each_stage(A, stages)[-1],
                         "stage_accuracies": row, "seconds": seconds[-1], **metrics.summarise(R, A, stages)}
        if memory is not None:
            stage_metrics["memory_size"] = len(memory)  # the effective size: quotas round down
        if on_stage_end is not None:
            # A snapshot: later stages must not change what the callback was handed.
            state = copy.deepcopy({"next_stage": stage.index + 1, "learner": learner.state(), "accuracy_matrix": R,
                                   "class_accuracy_matrix": A, "stage_seconds": seconds,
                                   "learner_shape": {"num_classes": ctx.num_classes, "input_dim": ctx.input_dim,
                                                     "input_shape": list(ctx.input_shape),
                                                     "source_shape": list(prepared.source_shape)}})
            on_stage_end(stage.index, stage_metrics, state)
    return RunResult(to_dict(config), stages, R, A, seconds, metrics.summarise(R, A, stages))
