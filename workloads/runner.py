"""The one stage loop: train a learner on each stage in turn, evaluate on every stage, fill the accuracy matrix.

`run_stream(config, resume_state, on_stage_end)` is what both `clorch run` and the Ray trials call; nothing
else loops over stages.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from workloads import metrics
from workloads.backbones import build_backbone
from workloads.config import ConfigError, RunConfig, scaled_lr, to_dict
from workloads.data.sources import LabelledData, load_source, source_shape
from workloads.features import FeatureStore
from workloads.data.shifts import stage_shifts
from workloads.data.streams import (Stream, blur, domain_slices, make_stage_stream, make_stream, stage_classes,
                                    stage_seed)
from workloads.learners import LEARNERS, Learner, LearnerContext, build_learner
from workloads.distributed import gather, shard_epoch, shard_owned, sum_across, world
from workloads.progress import ProgressLog
from workloads.rehearsal import Replay
from workloads import transforms

log = logging.getLogger(__name__)

StageCallback = Callable[[int, dict, dict], None]


@dataclass
class SplitScores:
    """The raw matrices of one evaluation split (`val` or `test`), one row per stage trained so far."""

    accuracy_matrix: list[list[float]] = field(default_factory=list)  # R[i][j]
    class_accuracy_matrix: list[list[float | None]] = field(default_factory=list)  # A[i][c]

    def metrics(self, stages: list[list[int]]) -> dict[str, float]:
        """Every derived metric (workloads.metrics) of the stages so far, unprefixed."""
        summary = metrics.summarise(self.accuracy_matrix, self.class_accuracy_matrix, stages)
        # after the latest stage, the accuracy on seen classes is by definition the average accuracy so far
        return {"accuracy_on_seen_classes": summary["average_accuracy"], **summary}

    def to_json(self, stages: list[list[int]]) -> dict[str, Any]:
        return {"accuracy_matrix": self.accuracy_matrix,
                **metrics.summarise(self.accuracy_matrix, self.class_accuracy_matrix, stages),
                "accuracy_on_seen_classes": metrics.accuracy_after_each_stage(self.class_accuracy_matrix, stages),
                "class_accuracy_matrix": self.class_accuracy_matrix}


@dataclass
class RunResult:
    """What a finished run hands back: the raw matrices per split, the derived metrics, per-stage timings and
    the protocol that produced them."""

    config: dict
    stages: list[list[int]]
    splits: dict[str, SplitScores]  # `test`, and `val` unless data.validation is 0
    stage_seconds: list[float]
    protocol: dict[str, Any]

    @property
    def test(self) -> SplitScores:
        return self.splits["test"]

    @property
    def val(self) -> SplitScores | None:
        return self.splits.get("val")

    @property
    def metrics(self) -> dict[str, float]:
        """`<split>/<metric>` for every split and every derived metric."""
        return {f"{name}/{k}": v for name, scores in self.splits.items()
                for k, v in scores.metrics(self.stages).items()}

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "stages": self.stages,
                **{name: None if name not in self.splits else self.splits[name].to_json(self.stages)
                   for name in metrics.SPLITS},
                "stage_seconds": self.stage_seconds, "config": self.config}


def describe_protocol(config: RunConfig, setup_data: str) -> dict[str, Any]:
    """What a reviewer asks of a run's numbers: is there a validation set, and did anything see a stage's
    inputs before that stage (`future_inputs`): the whole stream, or a "separate" source that is the stream's
    own data set."""
    own = getattr(config.learner, "key_init_data", None)
    same_source = (setup_data == "own_source" and (own.source, own.root) == (config.data.source, config.data.root))
    return {"axis": "domain" if config.data.stream != "class_incremental" else "stage",
            "validation": config.data.validation, "selection_split": "val" if config.data.validation else None,
            "setup_inputs": "stream_source" if same_source else setup_data,
            "future_inputs": setup_data == "stream" or same_source}


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The protocol in words, for the console."""
    v = protocol["validation"]
    lines = [f"validation: {v:g} of each stage's training data held out (never trained on)" if v else
             "validation: none (data.validation is 0): no validation set exists; only test scores are reported"]
    setup = protocol["setup_inputs"]
    if protocol["future_inputs"]:
        how = ("learner.key_init_data reads the stream's own data set" if setup == "stream_source"
               else "learner.key_init_data: stream")
        lines.append(f"FUTURE INPUTS USED: the learner's setup saw every stage's unlabelled inputs before stage 1 "
                     f"(transductive; {how})")
    else:
        lines.append("no future inputs: setup saw " + {"first_stage": "the first stage's inputs only",
                                                        "own_source": "a separate data source only"}[setup])
    return lines


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA where present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but this machine has no CUDA GPU (or torch has no CUDA build); "
                          "accepted here: auto or cpu")
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
    trains = LEARNERS[config.learner.name].trains_backbone
    if not trains:
        backbone.requires_grad_(False)
        store = FeatureStore(backbone, config.backbone.name, config.cache_dir, device)
    d = config.data
    if d.stream == "class_incremental":
        if trains:
            data = load_source(config.data)
            x_train, y_train = backbone.transform(data.x_train), data.y_train
            x_test, y_test = backbone.transform(data.x_test), data.y_test
            num_classes = data.num_classes
        else:
            f = store.labelled(config.data)
            x_train, y_train, x_test, y_test = f.x_train, f.y_train, f.x_test, f.y_test
            num_classes = f.num_classes
        present = set(torch.unique(torch.cat([y_train, y_test])).tolist())
        classes = stage_classes(num_classes, d.classes_per_stage, d.stages, d.class_order_seed, present,
                                d.class_order, config.seed)
        stream = make_stream(x_train, y_train, x_test, y_test, num_classes, classes, d.validation, config.seed)
    else:
        data = load_source(config.data)
        num_classes = data.num_classes
        parts = stage_parts(config, data, backbone, store)
        stream = make_stage_stream(parts, num_classes, d.validation, config.seed)
        x_train = stream[0].x_train
    stream = blur(stream, d.blurry, config.seed)  # any stream kind: a domain's samples reach its neighbours too
    if config.train.augment is not None:
        normalize_stream(stream, config, backbone)
    ctx = LearnerContext(num_classes=num_classes, input_dim=backbone.output_dim, train=config.train,
                         seed=config.seed, device=device, features=store,
                         backbone=None if store else backbone, rehearsal=config.rehearsal,
                         input_shape=tuple(x_train.shape[1:]))
    return PreparedStream(stream, ctx, tuple(shape))


def normalize_stream(stream: Stream, config: RunConfig, backbone) -> None:
    """train.augment: every stage's images normalised in place, what both evaluation and (augmented, per
    batch) training see. Only images as the source gives them: a pretrained backbone's transform resizes and
    normalises on its own."""
    if hasattr(backbone, "image_transform"):
        raise ConfigError(f"train.augment: augments the source's images; backbone {config.backbone.name} resizes "
                          "and normalises them itself; accepted with augment: backbone.name identity or small_cnn")
    x = stream[0].x_train
    transforms.Augment(config.train.augment, tuple(x.shape[1:]))  # refuses non-images, mismatched channels
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ConfigError(f"train.augment: needs images in [0, 1] (uint8 sources are divided by 255); "
                          f"data.source {config.data.source} gives values in [{float(x.min()):g}, {float(x.max()):g}]")
    for s in stream:
        s.x_train, s.x_test = (transforms.normalize(config.train.augment, v) for v in (s.x_train, s.x_test))
        if s.x_val is not None:
            s.x_val = transforms.normalize(config.train.augment, s.x_val)


def stage_parts(config: RunConfig, data: LabelledData, backbone=None, store: FeatureStore | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x_train, y_train, x_test, y_test) of each stage of a domain or user stream, through the backbone (the
    feature cache where `store` is given, the backbone's transform otherwise; raw inputs without a backbone)."""
    d = config.data
    if d.stream == "user":
        if data.d_train is None:
            raise ConfigError(f"data.stream: user needs stage ids shipped with the data (d_train and d_test arrays "
                              f"in an npz file, or image_folder domain folders root/<domain>/<class>/<image>); "
                              f"data.source {d.source} has none")
        if store is not None:
            f = store.labelled(config.data)
            x_train, x_test = f.x_train, f.x_test
        else:
            x_train, x_test = data.x_train, data.x_test
            if backbone is not None:
                x_train, x_test = backbone.transform(x_train), backbone.transform(x_test)
        out = []
        for sid in torch.unique(data.d_train).tolist():  # stages in the order of their ids
            tr, te = data.d_train == sid, data.d_test == sid
            out.append((x_train[tr], data.y_train[tr], x_test[te], data.y_test[te]))
        return out
    shifts = stage_shifts(d.num_domains or len(d.shifts), d.shift, d.shifts)
    slices = domain_slices(data.y_train, len(shifts), config.seed)
    out = []
    for shift, rows in zip(shifts, slices):
        if store is not None:
            x_tr = store.shifted(config.data, data, "train", rows, shift)
            x_te = store.shifted(config.data, data, "test", None, shift)
        else:
            x_tr, x_te = shift(data.x_train[rows]), shift(data.x_test)
            if backbone is not None:
                x_tr, x_te = backbone.transform(x_tr), backbone.transform(x_te)
        out.append((x_tr, data.y_train[rows], x_te, data.y_test))
    return out


def preflight(config: RunConfig, data: LabelledData | None = None) -> tuple[LabelledData, int]:
    """What a run would refuse in its data and learner, found without encoding or training anything: the
    source's arrays (sources.check_labelled: labels, shapes, finite inputs, classes), the stages cut from it,
    a DKVB's own key-init source, and the learner's options against the number of classes (a codebook too big
    for memory). A sweep runs this on its driver, so a mistake is one line there, not an error per trial.
    `data`: the source, when the caller loaded and checked it already. Returns the source and the number of
    stages of the run's stream."""
    from workloads.config import KeyInitData

    data = data or load_source(config.data)
    present = set(torch.unique(torch.cat([data.y_train, data.y_test])).tolist())
    d = config.data
    if d.stream == "class_incremental":
        stages = stage_classes(data.num_classes, d.classes_per_stage, d.stages, d.class_order_seed, present,
                               d.class_order, config.seed)
    elif d.stream == "domain_incremental":
        stages = stage_shifts(d.num_domains or len(d.shifts), d.shift, d.shifts)
        domain_slices(data.y_train, len(stages), config.seed)
        for shift in stages:  # on two samples: a shift that does not fit the inputs fails here, not in a trial
            shift(data.x_train[:2])
    else:
        stages = stage_parts(config, data)
    key_source = getattr(config.learner, "key_init_data", None)
    if isinstance(key_source, KeyInitData):
        load_source(key_source)
    LEARNERS[config.learner.name].check(config.learner, data.num_classes)
    return data, len(stages)


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
        learner.setup(setup_inputs(learner, prepared.stream))
        o = config.learner
        parts.append(f"keys ready ({o.num_codebooks} x {o.num_keys}, {o.key_init})")
    return "; ".join(parts) + f"; cache {ctx.features.cache_dir}"


def setup_inputs(learner: Learner, stream: Stream) -> torch.Tensor | None:
    """The unlabelled inputs `learner.setup` may see before stage 1: the first stage's training inputs unless
    the learner was told, by name, to read the whole stream (or reads a source of its own: None)."""
    mode = learner.setup_data
    if mode == "own_source":
        return None
    stages = stream if mode == "stream" else stream[:1]
    return torch.cat([s.x_train for s in stages])


def evaluate(learner, stream: Stream, split: str, batch_size: int, seen: int | None = None, inputs=None
             ) -> tuple[list[float], list[float | None]]:
    """Predict every stage's samples of `split` (`val` or `test`); return a row of R (stage j's accuracy on
    stage j's own samples) and a row of A (per class, over every stage's samples, or over the first `seen`
    stages' where stages share classes: a domain's class accuracy counts only once that domain is seen).
    `inputs`: what learner.eval_inputs made of those samples, when the caller keeps it from stage to stage."""
    x = torch.cat([s.split(split)[0] for s in stream]) if inputs is None else inputs
    y = torch.cat([s.split(split)[1] for s in stream])
    device = learner.ctx.device
    preds = torch.cat([learner.predict(x[i:i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, len(x), batch_size)])
    sizes = [len(s.split(split)[1]) for s in stream]
    row = [float((p == t).float().mean()) if len(t) else float("nan")
           for p, t in zip(preds.split(sizes), y.split(sizes))]
    n = len(y) if seen is None else sum(sizes[:seen])
    return row, metrics.class_accuracies(preds[:n], y[:n], stream.num_classes)


def epoch_batches(stage, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int | None,
                  replay: Replay | None) -> Callable[[torch.Generator, bool], Any]:
    """How the stage's epochs form their batches: returns `epoch(generator, first)`, which yields this process's
    (x, y) of each batch of one epoch. Without a memory, or with rehearsal.mode: mix, the stage's data is
    shuffled into batches of `batch_size` and each gets its replayed samples; with join, the memory (as it stands
    now, at the stage's start) joins the data: ceil((stage + memory) / batch_size) batches. In the `first` epoch
    an online memory (reservoir) is offered each batch's stage samples."""
    n = len(labels)
    rank, size = world()  # data-parallel processes each take every size-th sample of a batch (and of replay)
    join = replay is not None and replay.join
    distributed = replay is not None and replay.memory.distributed
    tensors, owners = (inputs, labels), None
    if join:
        memory = replay.joined()
        if memory is not None:
            tensors = (torch.cat([inputs, memory[0]]), torch.cat([labels, memory[1]]))
        if distributed:  # the epoch walks the stage and every worker's memory; each worker holds only its own
            sizes = gather(0 if memory is None else len(memory[1]))
            owners = torch.cat([torch.full((n,), -1)] + [torch.full((m,), r) for r, m in enumerate(sizes)])
    total = len(tensors[0]) if owners is None else len(owners)
    batch = total if batch_size is None else min(batch_size, total)

    def offer(full: torch.Tensor, gen: torch.Generator) -> None:
        rows = full[full < n]  # the stage's own samples, not the memory's joined to them
        if distributed:  # worker r's memory takes rows r::size of the stage's data, as at a stage's end
            rows = rows[rows % size == rank]
        replay.offer(stage.x_train[rows], inputs[rows.to(inputs.device)], stage.y_train[rows], gen)

    def epoch(gen: torch.Generator, first: bool):
        online = first and replay is not None and replay.online
        batches = shard_epoch(tensors, batch, gen) if owners is None else shard_owned(tensors, owners, batch, gen)
        for full, (x, y) in batches:
            if replay is not None and not join:
                drawn = replay.draw(len(full), gen)
                if drawn is not None:
                    x, y = torch.cat([x, drawn[0]]), torch.cat([y, drawn[1]])
            if online:  # every process walks the full batch: one global memory, or each its own rows
                offer(full, gen)
            yield x, y
    return epoch


def train_stage(learner, stage, config: RunConfig, total_stages: int, replay: Replay | None = None) -> float:
    """Run `train.epochs` passes over the stage's training data, with the memory's samples mixed into each
    batch or joined to the data (rehearsal.mode); returns the last epoch's mean loss."""
    t = config.train
    device = learner.ctx.device
    # the recipe (workloads.transforms): per-batch augmentation, the stage's lr schedule, mixed precision
    augment = None if t.augment is None else transforms.Augment(t.augment, learner.ctx.input_shape)
    schedule = transforms.cosine_schedule(learner.optimizer, t, t.epochs)
    precision = transforms.resolve_precision(t.precision, device,
                                             learner.trains_backbone and len(learner.ctx.input_shape) == 3)
    inputs = learner.stage_inputs(stage.x_train.to(device))
    labels = stage.y_train.to(device)
    batches = epoch_batches(stage, inputs, labels, t.batch_size, replay)
    rank = world()[0]
    gen = torch.Generator().manual_seed(stage_seed(config.seed, stage.index))
    progress = ProgressLog(log)
    mean_loss = float("nan")
    # every epoch's batches are the stage's inputs, each row once, when nothing joins them (shard_epoch)
    learner.begin_epochs(inputs if replay is None and world()[1] == 1 else None)
    done = 0  # epochs run in full
    try:
        for epoch in range(t.epochs):
            # float32 sums, as a float32 tensor summed them before: the reported loss keeps its last bits
            loss_sum, samples = np.float32(0), np.float32(0)
            for b, (x, y) in enumerate(batches(gen, epoch == 0)):
                if augment is not None:  # the raw images of the whole batch, replayed ones included
                    x = augment(x, transforms.augment_seed(config.seed, stage.index, epoch, b, rank))
                with transforms.autocast(precision, device):
                    loss_sum += np.float32(learner.observe(transforms.to_device(x, device), y) * len(y))
                samples += np.float32(len(y))
            total = sum_across(torch.tensor([loss_sum, samples], dtype=torch.float32))
            mean_loss = float(total[0] / total[1].clamp(min=1))
            if schedule is not None:
                schedule.step(epoch)  # as DyTox's main.py: epoch e > 0 trains at the schedule's lr of e - 1
            progress("stage %d/%d epoch %d/%d loss %.4f", stage.index + 1, total_stages, epoch + 1, t.epochs,
                     mean_loss, last=epoch + 1 == t.epochs)
            done += 1
    finally:  # an epoch cut short by an error is not counted (its stage is lost anyway)
        learner.end_epochs(done)
    return mean_loss


def arriving_classes(stage) -> list[int]:
    """The classes a stage's training data shows: its own, then (blurry streams) other stages' in order of
    appearance; what the memory takes in at the stage."""
    own = list(stage.classes)
    return own + [c for c in dict.fromkeys(stage.y_train.tolist()) if c not in own]


@torch.no_grad()
def batched_features(learner, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`learner.features` over `x` in evaluation mode, batch by batch, on the CPU."""
    learner.eval()
    device = learner.ctx.device
    return torch.cat([learner.features(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def run_stream(config: RunConfig, resume_state: dict | None = None,
               on_stage_end: StageCallback | None = None, prepared: PreparedStream | None = None) -> RunResult:
    """Train `config.learner` on the stream stage by stage; resume after the stages `resume_state` holds.

    After each stage the learner is scored on every stage's validation and test samples. `on_stage_end(
    stage_index, stage_metrics, state)` then receives the metrics so far (`val/...` and `test/...`), the
    protocol, and the full state to resume from (learner tensors and optimiser, the matrices so far).
    """
    prepared = prepared or prepare(config)
    stream, ctx = prepared.stream, prepared.context
    learner = build_learner(config.learner, ctx).to(ctx.device)
    if ctx.device.type == "cuda" and len(ctx.input_shape) == 3:
        learner.to(memory_format=torch.channels_last)  # convolutions over the channels-last batches to_device makes
    if config.train.lr_scale_batch is not None:
        lrs = {"train.lr": config.train.lr, "learner.finetune_lr": getattr(config.learner, "finetune_lr", None)}
        log.info("effective lr (x batch %d / %d): %s", config.train.batch_size, config.train.lr_scale_batch,
                 ", ".join(f"{k} {v:g} -> {scaled_lr(config.train, v):g}" for k, v in lrs.items() if v is not None))
    stages = [list(s.classes) for s in stream]
    split_names = [name for name in metrics.SPLITS if name == "test" or stream.has_validation]
    splits = {name: SplitScores() for name in split_names}
    seconds: list[float] = []
    first = 0
    protocol = describe_protocol(config, learner.setup_data)
    if resume_state is not None:
        if "splits" not in resume_state:
            raise ConfigError("the stage checkpoint was written by a clorch without validation splits; its run "
                              "cannot continue under this protocol: start the run again")
        learner.load_state(resume_state["learner"])
        splits = {name: SplitScores(**copy.deepcopy(m)) for name, m in resume_state["splits"].items()}
        seconds = list(resume_state["stage_seconds"])
        first = resume_state["next_stage"]
        log.info("resuming at stage %d/%d", first + 1, len(stream))
    else:
        torch.manual_seed(config.seed)
        inputs = setup_inputs(learner, stream)
        learner.setup(None if inputs is None else inputs.to(ctx.device))
    memory = learner.memory
    # Task-free: the same loop feeds the learner stage after stage, one pass, but no hook hands it a stage;
    # the runner alone knows the boundaries, and evaluates and checkpoints at them.
    task_free = config.train.task_free
    if task_free:
        learner.begin_online()
    eval_inputs: dict[str, Any] = {}  # per split, made once per run: what a learner precomputes (None: nothing)
    for stage in stream[first:]:
        t0 = time.perf_counter()
        torch.manual_seed(stage_seed(config.seed, stage.index, "torch"))
        if not task_free:
            learner.begin_stage(stage)
        replay = None
        if memory is not None:
            memory_gen = torch.Generator().manual_seed(stage_seed(config.seed, stage.index, "memory"))
            if not task_free:  # task-free: classes join the (reservoir) memory as the batches show them
                memory.begin_stage(arriving_classes(stage), memory_gen)
            rank, workers = world()
            # a distributed memory on several workers draws for itself: the batches' generator must stay alike
            own = torch.Generator().manual_seed(stage_seed(config.seed, stage.index, "replay") ^ rank) \
                if memory.distributed and workers > 1 else None
            replay = Replay(memory, learner.stage_inputs, config.rehearsal.replay_ratio, ctx.device,
                            announce=task_free, join=config.rehearsal.mode == "join", generator=own)
        loss = train_stage(learner, stage, config, len(stream), replay)
        if memory is not None:
            if not task_free:
                memory.end_stage(stage.x_train, stage.y_train, arriving_classes(stage),
                                 lambda x: batched_features(learner, x, config.train.eval_batch_size), memory_gen)
            held = memory.check_across()
        if not task_free:
            learner.end_stage(stage, is_last=stage.index == len(stream) - 1)
        stage_metrics = {"stage": stage.index, "num_stages": len(stream), "classes": list(stage.classes),
                         "loss": loss, "protocol": protocol}
        for name, scores in splits.items():
            if name not in eval_inputs:
                plain = torch.cat([s.split(name)[0] for s in stream])
                made = learner.eval_inputs(plain)
                eval_inputs[name] = None if made is plain else made  # plain inputs: not held between stages
                del plain, made
            row, class_row = evaluate(learner, stream, name, config.train.eval_batch_size,
                                      None if stream.axis == "stage" else stage.index + 1, eval_inputs[name])
            scores.accuracy_matrix.append(row)
            scores.class_accuracy_matrix.append(class_row)
            stage_metrics[f"{name}/stage_accuracies"] = row
            stage_metrics.update({f"{name}/{k}": v for k, v in scores.metrics(stages[:stage.index + 1]).items()})
        seconds.append(time.perf_counter() - t0)
        stage_metrics["seconds"] = seconds[-1]
        if memory is not None:
            stage_metrics["memory_size"] = held  # the effective size (quotas round down), over all workers
        if on_stage_end is not None:
            # A snapshot: later stages must not change what the callback was handed.
            state = copy.deepcopy({"next_stage": stage.index + 1, "learner": learner.state(),
                                   "splits": {name: dataclasses.asdict(s) for name, s in splits.items()},
                                   "stage_seconds": seconds, "protocol": protocol,
                                   "learner_shape": {"num_classes": ctx.num_classes, "input_dim": ctx.input_dim,
                                                     "input_shape": list(ctx.input_shape),
                                                     "source_shape": list(prepared.source_shape)}})
            on_stage_end(stage.index, stage_metrics, state)
    return RunResult(to_dict(config), stages, splits, seconds, protocol)
