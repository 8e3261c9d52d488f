"""The run configuration: one dataclass tree, its defaults, and strict parsing from plain dicts.

Every option a run accepts is a field below (or a field of a learner's own options class, registered in
`workloads.learners`). `parse_run_config` turns a dict (from YAML) into a `RunConfig`, rejecting unknown keys
and wrong types with a `ConfigError` that names the dotted key and what is accepted.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A user mistake in a config: the message names the offending key or value and what is accepted."""


SEED_LIMIT = 2**63  # seeds are signed 64-bit integers wherever they go (torch, numpy, JSON readers)


@dataclass
class ShiftConfig:
    """An input shift of a domain-incremental stream (workloads.data.shifts): its name and amount."""

    name: str = "none"  # see workloads.data.shifts.SHIFTS
    step: float | None = None  # data.shift: stage s gets amount s * step
    value: float | None = None  # data.shifts: this stage's amount
    seed: int = 0  # random shifts (permutation, drift, noise) draw from this seed, not the run's
    corruption: str | None = None  # name: corruption: the ImageNet-C corruption (imagecorruptions package)
    severity: int | None = None  # name: corruption in data.shifts: this stage's severity 0..5


STREAM_KINDS = ("class_incremental", "domain_incremental", "user")


@dataclass
class DataConfig:
    """Where the labelled data comes from, how it is cut into stages, what is held out."""

    # class_incremental: disjoint classes per stage; domain_incremental: every class in every stage, stage s a
    # disjoint slice of the training data under input shift s; user: stage ids shipped with the data (npz
    # d_train / d_test, or image_folder's domain folders root/<domain>/<class>/<image>)
    stream: Literal["class_incremental", "domain_incremental", "user"] = "class_incremental"
    num_domains: int | None = None  # domain_incremental: the number of stages (or len(shifts))
    shift: ShiftConfig | None = None  # domain_incremental: one shift, amount s * step at stage s
    shifts: list[ShiftConfig] | None = None  # domain_incremental: one shift per stage

    source: Literal["toy2d", "digits", "digits_32", "cifar10", "cifar100", "image_folder", "npz"] = "digits"
    root: str | None = None  # cifar: folder holding (or receiving) the archive; image_folder: the folder; npz: the file
    download: bool = False  # cifar only: let torchvision download into `root` (needs a network)
    classes_per_stage: int = 2
    stages: list[list[int]] | None = None  # explicit stages (lists of class ids); overrides classes_per_stage
    class_order_seed: int | None = None  # None keeps the natural class order; kept apart from the training seed
    class_order: list[int] | str | None = None  # an explicit order, a named one (orders.CLASS_ORDERS), or "seed"
    validation: float = 0.1  # fraction of each stage's training data held out per class for model selection
    image_size: int = 32  # image_folder: images are resized to image_size x image_size
    domains: list[str] | None = None  # image_folder with domain folders: which, in stage order (None: sorted names)
    test_fraction: float = 0.3  # digits(_32) / image_folder: stratified held-out fraction (fixed split seed 0)
    train_samples_per_class: int = 50  # toy2d: 50 per class = the paper's 100 samples per stage
    test_samples_per_class: int = 200  # toy2d
    blurry: float = 0.0  # fraction of each stage's training samples dealt to the other stages (streams.blur)


# Where a learner's unsupervised setup (DKVB's key learning) reads its unlabelled inputs, when from the stream:
# `first_stage` sees only what stage 1 shows; `stream` sees every stage's inputs before stage 1 (transductive).
SETUP_MODES = ("first_stage", "stream")


@dataclass
class KeyInitData:
    """Unlabelled inputs that a DKVB learns its keys on, from a source of their own (not the stream)."""

    source: Literal["unit_square", "toy2d", "digits", "digits_32", "cifar10", "cifar100", "image_folder",
                    "npz"] = "unit_square"
    root: str | None = None
    download: bool = False
    num_samples: int = 10000  # unit_square: uniform samples of [0, 1]^2; other sources: at most this many
    image_size: int = 32


@dataclass
class BackboneConfig:
    """The frozen encoder in front of the learner (`identity` for vector data)."""

    name: str = "identity"
    pretrained: bool = False
    checkpoint: str | None = None
    layer: str | None = None


@dataclass
class NormalizeConfig:
    """Per-channel mean and std of a normalisation: x -> (x - mean) / std on images in [0, 1]."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class AugmentConfig:
    """Per-batch image augmentation of learners that train their backbone (workloads.transforms); the defaults
    are DyTox's CIFAR recipe. Evaluation inputs get the normalisation only."""

    crop_padding: int | None = 4  # random crop of the image's own size after zero padding; null: no crop
    flip: bool = True  # random horizontal flip, p = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # a timm RandAugment policy string; null: none
    color_jitter: float | None = None  # brightness = contrast = saturation jitter; not with rand_augment (timm)
    normalize: str | NormalizeConfig | None = "cifar100"  # a named set (transforms.NORMALIZE), mean/std, or null


@dataclass
class TrainConfig:
    """How each stage is trained: the same for every learner."""

    epochs: int = 1  # passes over each stage's training data
    batch_size: int | None = 256  # None = full batch
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    label_smoothing: float = 0.0
    eval_batch_size: int = 1024
    task_free: bool = False  # one pass over one stream of batches; the learner is never told where stages end
    augment: AugmentConfig | None = None  # image learners that train their backbone: per-batch augmentation
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: timm's, per stage, stepped per epoch
    warmup_epochs: int = 0  # cosine: linear warm-up from warmup_lr over the first epochs of each stage
    warmup_lr: float = 0.0
    min_lr: float = 0.0  # cosine: the lr the schedule decays to
    lr_scale_batch: int | None = None  # lr (and finetune lrs) x batch_size / lr_scale_batch; null: as given
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast for image learners on CUDA GPUs with bf16, else fp32


@dataclass
class RehearsalConfig:
    """A replay memory usable with every learner (see workloads.rehearsal); memory_size 0 = none."""

    memory_size: int = 0  # one global budget in samples, whatever the number of data-parallel workers
    selection: Literal["random", "reservoir", "herding"] = "random"
    # mix: replayed samples drawn into each batch, replay_ratio per new sample; join: the memory joins the
    # stage's data and one epoch walks both shuffled together (the official DyTox code's way)
    mode: Literal["mix", "join"] = "mix"
    replay_ratio: float = 1.0  # mode mix: replayed samples drawn from the memory per new sample in each batch
    # true: one memory per data-parallel worker, memory_size // workers each, chosen from the worker's own shard
    # (DyTox's erratum: its paper's numbers used such a distributed memory); false: one global memory
    distributed: bool = False


@dataclass
class RunConfig:
    """One run: data stream, backbone, learner, training schedule, rehearsal memory, seed."""

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    learner: Any = None  # the chosen learner's options dataclass (has a `name` field); see workloads.learners
    train: TrainConfig = field(default_factory=TrainConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)
    preset: str | None = None  # a named config from PRESETS, applied under the file's own keys
    cache_dir: str | None = None  # feature and key caches; None: $CLORCH_CACHE_DIR or ~/.cache/clorch


def _dytox_cifar100(stages: int) -> dict[str, Any]:
    """DyTox's CIFAR-100 setting (Douillard et al., CVPR 2022) in `stages` stages of 100 / stages classes, as the
    official code trains it (options/model/cifar_dytox.yaml and main.py's defaults; README, "DyTox: the paper's
    recipe", names what differs). DyTox+ is the same with learner.mixup: true."""
    classes_per_stage = 100 // stages
    return {
        # DER's class order (the one every baseline of the paper's table uses)
        "data": {"source": "cifar100", "classes_per_stage": classes_per_stage, "class_order": "cifar100_order1"},
        "backbone": {"name": "identity"},
        # 5 GPSA self-attention blocks + 1 task-attention block, 12 heads, dimension 384, patches of 4x4 pixels,
        # drop-path 0.1; divergence head weight 0.1; KD averaged over batch x old classes; a fresh token per stage;
        # 20 epochs of balanced fine-tuning after each stage at a constant 5e-5 (scaled below)
        "learner": {"name": "dytox", "embed_dim": 384, "depth": 5, "heads": 12, "patch_size": 4,
                    "sab": "gpsa", "locality_strength": 1.0, "drop_path": 0.1, "div_weight": 0.1,
                    "kd_reduction": "mean", "new_token": "fresh", "finetune_epochs": 20, "finetune_lr": 5e-5},
        # 2000 images chosen by herding, joined to each stage's data; split over the data-parallel workers
        # (1000 each on the paper's 2 GPUs), as the paper's CIFAR runs had it (the erratum)
        "rehearsal": {"memory_size": 2000, "selection": "herding", "mode": "join", "distributed": True},
        # AdamW, weight decay 1e-6, 500 epochs per stage; batch 128 per GPU on 2 GPUs = 256, lr 5e-4 x 256 / 512;
        # cosine schedule per stage, 5 warm-up epochs from 1e-6, down to 1e-5; random crop (padding 4), flip,
        # RandAugment rand-m9-mstd0.5-inc1, CIFAR-100 normalisation; fp32 (the CIFAR runs had mixed precision off)
        "train": {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-6, "batch_size": 256, "lr_scale_batch": 512,
                  "epochs": 500, "schedule": "cosine", "warmup_epochs": 5, "warmup_lr": 1e-6, "min_lr": 1e-5,
                  "augment": {}, "precision": "fp32"},
    }


# Named configs: merged under the user's keys, so anything set explicitly wins. A preset named after a paper
# either runs that paper's protocol or says in its name that it holds the model only.
PRESETS: dict[str, dict[str, Any]] = {
    # Träuble et al. (ICML 2023), the model and optimiser only: 256 codebooks of 4096 keys of dimension 14,
    # values of dimension = number of classes read by the voting decoder, SGD lr 0.3 without momentum,
    # gradient clipping 1.0, batch 256, label smoothing 0.1. Only the values are trained. The protocol (2000
    # epochs per stage, keys learned on a separate data set) is search_spaces/dkvb_cifar10_paper.yaml.
    "dkvb_paper_model": {
        "learner": {
            "name": "dkvb", "num_codebooks": 256, "num_keys": 4096, "key_dim": 14, "value_dim": None,
            "decoder": "vote", "key_init": "ema", "key_init_decay": 0.95,
        },
        "train": {
            "optimizer": "sgd", "lr": 0.3, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 1.0,
            "batch_size": 256, "label_smoothing": 0.1,
        },
    },
    "dytox_cifar100_10": _dytox_cifar100(10),
    "dytox_cifar100_20": _dytox_cifar100(20),
    "dytox_cifar100_50": _dytox_cifar100(50),
    # DyTox scaled down to scikit-learn's digits as 8x8 images: about 20 s on 2 CPU cores for 5 stages
    "dytox_tiny": {
        "data": {"source": "digits", "classes_per_stage": 2},
        "backbone": {"name": "identity"},
        "learner": {"name": "dytox", "embed_dim": 32, "depth": 2, "heads": 4, "patch_size": 4,
                    "div_weight": 0.1, "finetune_epochs": 10},
        "rehearsal": {"memory_size": 200, "selection": "herding"},
        "train": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 30},
    },
}


# Presets that were renamed, with why: a config naming the old name gets an error that says what to use.
RENAMED_PRESETS = {
    "dkvb_paper": "dkvb_paper_model (it sets the paper's model and optimiser, not its protocol; "
                  "search_spaces/dkvb_cifar10_paper.yaml runs the protocol)",
}


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: `override` laid over `base`, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_run_config(raw: dict | None) -> RunConfig:
    """Validate a plain dict into a RunConfig, applying its preset; raises ConfigError on any mistake."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"the run config must be a mapping, got {type(raw).__name__}")
    preset = raw.get("preset")
    if preset is not None:
        if preset in RENAMED_PRESETS:
            raise ConfigError(f"preset: {preset!r} is now {RENAMED_PRESETS[preset]}")
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r}; accepted: {', '.join(sorted(PRESETS))}")
        raw = deep_merge(PRESETS[preset], raw)
    learner_raw = raw.pop("learner", None)
    config = from_dict(RunConfig, raw, "")
    config.learner = parse_learner(learner_raw)
    check_run_config(config)
    return config


def parse_learner(raw: Any):
    """The learner block: `name` picks the learner, whose options class validates the rest."""
    from workloads.learners import LEARNERS  # the registry imports learners, which import this module

    raw = {"name": "dkvb"} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"learner: expected a mapping with a 'name', got {raw!r}")
    name = raw.get("name", "dkvb")
    if name in ("replay", "er", "experience_replay"):
        raise ConfigError(f"learner.name: {name!r} is not a learner: experience replay is any learner with a memory, "
                          "e.g. learner: {name: mlp} with rehearsal: {memory_size: 200}")
    if name not in LEARNERS:
        raise ConfigError(f"learner.name: unknown learner {name!r}; accepted: {', '.join(sorted(LEARNERS))}")
    return from_dict(LEARNERS[name].Options, raw, "learner")


def check_run_config(config: RunConfig) -> None:
    """Checks that span fields (ranges, combinations); types were checked while parsing."""
    positive = {
        "data.classes_per_stage": config.data.classes_per_stage,
        "data.image_size": config.data.image_size,
        "data.train_samples_per_class": config.data.train_samples_per_class,
        "data.test_samples_per_class": config.data.test_samples_per_class,
        "train.epochs": config.train.epochs,
        "train.eval_batch_size": config.train.eval_batch_size,
    }
    if config.train.batch_size is not None:
        positive["train.batch_size"] = config.train.batch_size
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value}")
    for key, seed in (("seed", config.seed), ("data.class_order_seed", config.data.class_order_seed)):
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"{key}: must be an integer in [0, 2**63), got {seed}")
    t = config.train
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    for key, value in (("train.momentum", t.momentum), ("train.weight_decay", t.weight_decay)):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip: the largest gradient norm must be > 0 (null: no clipping), "
                          f"got {t.grad_clip}")
    check_recipe(config)
    if config.rehearsal.memory_size < 0:
        raise ConfigError(f"rehearsal.memory_size: must be >= 0 (0 = no memory), got {config.rehearsal.memory_size}")
    if config.rehearsal.replay_ratio < 0:
        raise ConfigError(f"rehearsal.replay_ratio: must be >= 0, got {config.rehearsal.replay_ratio}")
    if config.rehearsal.mode == "join" and config.rehearsal.replay_ratio != RehearsalConfig.replay_ratio:
        raise ConfigError(f"rehearsal.replay_ratio: {config.rehearsal.replay_ratio} applies to rehearsal.mode: mix "
                          "only; with rehearsal.mode: join the memory joins the stage's data, each epoch walks it "
                          "once (drop replay_ratio, or use rehearsal.mode: mix)")
    if not 0 <= config.data.validation < 1:
        raise ConfigError(f"data.validation: the held-out fraction must lie in [0, 1) (0 = no validation set), "
                          f"got {config.data.validation}")
    check_class_order(config.data)
    if not 0 < config.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must lie in (0, 1), got {config.data.test_fraction}")
    if not 0 <= config.train.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: must lie in [0, 1), got {config.train.label_smoothing}")
    check_stream(config)
    if config.data.stages is not None:
        seen: set[int] = set()
        for i, stage in enumerate(config.data.stages):
            if not stage:
                raise ConfigError(f"data.stages[{i}]: a stage needs at least one class")
            repeated = seen.intersection(stage)
            if repeated or len(set(stage)) != len(stage):
                raise ConfigError(f"data.stages[{i}]: class {sorted(repeated or stage)[0]} appears twice; "
                                  "each class belongs to one stage")
            seen.update(stage)
    check_stream_mode(config)
    from workloads.backbones import BACKBONES

    if config.backbone.name not in BACKBONES:
        raise ConfigError(f"backbone.name: unknown backbone {config.backbone.name!r}; "
                          f"accepted: {', '.join(sorted(BACKBONES))}")
    if hasattr(config.learner, "check"):
        config.learner.check()


def check_recipe(config: RunConfig) -> None:
    """train.augment, the schedule, lr scaling: their ranges and the learners and inputs they need."""
    t = config.train
    if t.augment is not None:
        from workloads.learners import LEARNERS  # the registry imports learners, which import this module
        from workloads.transforms import check_augment

        learner = LEARNERS.get(getattr(config.learner, "name", None))
        if learner is not None and not learner.trains_backbone:
            raise ConfigError(f"train.augment: {config.learner.name} learns on embeddings from the frozen feature "
                              "cache, which never holds augmented inputs; accepted with augment: learners that "
                              "train their backbone (finetune, dytox), or train.augment: null")
        if config.data.source in ("toy2d",):
            raise ConfigError(f"train.augment: augments images; data.source {config.data.source} gives vectors")
        check_augment(t.augment)
    if t.schedule == "constant":
        for key in ("warmup_epochs", "warmup_lr", "min_lr"):
            if getattr(t, key):
                raise ConfigError(f"train.{key}: belongs to train.schedule: cosine (this run's schedule is "
                                  f"constant); accepted: 0, or train.schedule: cosine")
    else:
        if not 0 <= t.warmup_epochs <= t.epochs:
            raise ConfigError(f"train.warmup_epochs: must lie in [0, train.epochs = {t.epochs}], got {t.warmup_epochs}")
        for key in ("warmup_lr", "min_lr"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
        if t.task_free:
            raise ConfigError("train.schedule: cosine restarts at every stage, a boundary task-free training has "
                              "none of; accepted with task_free: train.schedule: constant")
    if t.lr_scale_batch is not None:
        if t.lr_scale_batch <= 0:
            raise ConfigError(f"train.lr_scale_batch: the reference batch must be a positive integer, "
                              f"got {t.lr_scale_batch}")
        if t.batch_size is None:
            raise ConfigError("train.lr_scale_batch: scales the lr by train.batch_size, which is null (full batch); "
                              "set train.batch_size or drop lr_scale_batch")


def scaled_lr(train: TrainConfig, lr: float) -> float:
    """`lr` scaled linearly with the global batch (train.lr_scale_batch: lr x batch_size / reference)."""
    return lr if train.lr_scale_batch is None else lr * train.batch_size / train.lr_scale_batch


def check_stream(config: RunConfig) -> None:
    """data.stream and its keys: domains and shifts only for domain streams, one shift form at a time."""
    d = config.data
    if d.domains is not None and d.source != "image_folder":
        raise ConfigError(f"data.domains: names the domain folders of an image_folder root; data.source is "
                          f"{d.source} (drop data.domains, or use data.source: image_folder)")
    if d.stream != "domain_incremental":
        for key in ("num_domains", "shift", "shifts"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key}: only for data.stream: domain_incremental (this run's stream is "
                                  f"{d.stream})")
    else:
        if d.shift is not None and d.shifts is not None:
            raise ConfigError("data.shifts: set either data.shift (one shift growing with the stage) or data.shifts "
                              "(one per stage), not both")
        if d.shifts is not None:
            if not d.shifts:
                raise ConfigError("data.shifts: needs at least one stage's shift")
            if d.num_domains is not None and d.num_domains != len(d.shifts):
                raise ConfigError(f"data.num_domains: {d.num_domains}, but data.shifts lists {len(d.shifts)} "
                                  "shifts; accepted: one shift per domain (or drop num_domains)")
        elif d.num_domains is None:
            raise ConfigError("data.num_domains: a domain_incremental stream needs its number of domains "
                              "(or data.shifts, one per domain)")
        elif d.num_domains <= 0:
            raise ConfigError(f"data.num_domains: must be a positive integer, got {d.num_domains}")
    if d.stream != "class_incremental":
        for key in ("stages", "class_order", "class_order_seed"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key}: cuts classes into stages, which a {d.stream} stream does not "
                                  "(every stage holds every class)")
        if config.learner is not None and getattr(config.learner, "name", None) == "dytox":
            raise ConfigError(f"learner.name: dytox grows one head per stage of new classes; accepted with data.stream: "
                              f"{d.stream}: dkvb, linear, mlp, finetune")


def check_stream_mode(config: RunConfig) -> None:
    """data.blurry and train.task_free: their ranges, and the learners and memories that cannot work with them."""
    from workloads.learners import LEARNERS  # the registry imports learners, which import this module

    learner = LEARNERS.get(getattr(config.learner, "name", None))
    if not 0 <= config.data.blurry < 1:
        raise ConfigError(f"data.blurry: the fraction of each stage's training samples moved to the other stages "
                          f"must lie in [0, 1) (0 = disjoint stages), got {config.data.blurry}")
    if config.data.blurry and learner is not None and learner.stage_classes_only:
        raise ConfigError(f"data.blurry: {config.learner.name} trains one classifier per stage over that stage's "
                          "classes and cannot take other stages' samples; accepted with it: data.blurry: 0")
    if not config.train.task_free:
        return
    if learner is not None and learner.needs_stage_boundaries:
        raise ConfigError(f"train.task_free: {config.learner.name} needs stage boundaries "
                          f"({learner.needs_stage_boundaries}); accepted with it: train.task_free: false")
    if config.train.epochs != 1:
        raise ConfigError(f"train.task_free: the stream is seen once, so train.epochs must be 1, "
                          f"got {config.train.epochs}")
    if config.rehearsal.mode == "join":
        raise ConfigError("train.task_free: rehearsal.mode: join joins the memory to a stage's data at the stage's "
                          "start, a boundary task-free training has none of; accepted: rehearsal.mode: mix")
    if config.rehearsal.memory_size and config.rehearsal.selection != "reservoir":
        raise ConfigError(f"train.task_free: rehearsal.selection {config.rehearsal.selection!r} chooses at stage "
                          "ends, which task-free training has none of; accepted: rehearsal.selection: reservoir")
    if getattr(config.learner, "prune", False):
        raise ConfigError("train.task_free: learner.prune prunes after the last stage, a boundary a task-free "
                          "learner never sees; accepted with task_free: learner.prune: false")


def check_class_order(data: DataConfig) -> None:
    """data.class_order: a named order, `seed`, or a list of distinct class ids; not with class_order_seed."""
    from workloads.data.orders import CLASS_ORDERS, SEEDED_ORDER

    order = data.class_order
    if order is None:
        return
    if data.class_order_seed is not None:
        raise ConfigError("data.class_order: set either class_order or class_order_seed, not both "
                          "(class_order: seed shuffles with the run's seed)")
    if data.stages is not None:
        raise ConfigError("data.class_order: explicit data.stages already fix the order; drop one of them")
    if isinstance(order, str):
        if order != SEEDED_ORDER and order not in CLASS_ORDERS:
            raise ConfigError(f"data.class_order: unknown order {order!r}; accepted: a list of class ids, "
                              f"{SEEDED_ORDER!r} (shuffled with the run's seed), {', '.join(sorted(CLASS_ORDERS))}")
        return
    if not order:
        raise ConfigError("data.class_order: an explicit order needs at least one class")
    repeated = sorted({c for c in order if order.count(c) > 1})
    if repeated:
        raise ConfigError(f"data.class_order: class {repeated[0]} appears twice; each class arrives once")


def to_dict(config: Any) -> Any:
    """A config dataclass as plain dicts and lists (JSON / YAML ready)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    return config


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted keys that `--set` and sweeps address."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# --- strict dict -> dataclass conversion -------------------------------------------------------------------

def from_dict(cls: type, raw: Any, path: str):
    """Build dataclass `cls` from `raw`, checking keys and types; `path` is the dotted prefix for messages."""
    where = path or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{key}: unknown key; accepted keys{' in ' + path if path else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}; accepted: {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}; accepted: {_describe(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}; accepted: {_describe(tp)}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan or .inf would train to garbage without a word
                raise ConfigError(f"{key}: got {value!r}; accepted: a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: got {value!r}; accepted: {_describe(tp)}")
