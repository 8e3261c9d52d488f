"""Streams: a labelled dataset cut into stages. Class-incremental: each stage holds a disjoint set of classes
(blurry, `blur`: part of each stage's training samples moved to the other stages).
Domain-incremental: every stage holds every class, on its own disjoint slice of the training data under its
own input shift (workloads.data.shifts). User: the stage of every sample is shipped with the data.

Each stage's training data is split once more: a class-balanced validation part (the same fraction of every
class, drawn with a seed of its own) is held out and never trained on; models are selected on it, never on
test data.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from workloads.config import ConfigError
from workloads.data.orders import CLASS_ORDERS, SEEDED_ORDER


# The purposes a stage draws random numbers for; each has a stream of its own. "torch": the global generator
# a stage starts from (what begin_stage initialises, dropout); "batches": the order of its batches.
SEED_PURPOSES = ("torch", "batches", "memory", "replay", "finetune", "validation", "domains", "blurry", "augment")


def stage_seed(seed: int, stage: int, purpose: str = "batches") -> int:
    """Every stage draws from its own seeds, so a run resumed at a stage replays what an uninterrupted one does.

    The seed is a hash of (seed, stage, purpose), 63 bits, all of them mixed: torch's CPU generator keeps only
    the low 32 bits of a seed, so seeds that differ only in their high bits would give one stream."""
    if purpose not in SEED_PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; one of {', '.join(SEED_PURPOSES)}")
    digest = hashlib.blake2b(f"{seed}/{stage}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Stage:
    """One stage of a stream: its classes and their train / validation / test samples (labels keep the
    source's ids); validation samples come out of the source's training split and are never trained on."""

    index: int
    classes: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None  # None: the run has no validation set (data.validation: 0)
    y_val: torch.Tensor | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of an evaluation split: `val` or `test`."""
        return (self.x_val, self.y_val) if name == "val" else (self.x_test, self.y_test)


class Stream:
    """An ordered list of stages over one label space; index or slice it like a list."""

    def __init__(self, stages: list[Stage], num_classes: int, axis: str = "stage"):
        self.stages = stages
        self.num_classes = num_classes
        self.axis = axis  # what a stage is called in reports: "stage" (classes) or "domain"

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Stream(self.stages[i], self.num_classes, self.axis)
        return self.stages[i]

    @property
    def has_validation(self) -> bool:
        return bool(self.stages) and self.stages[0].y_val is not None

    @property
    def classes(self) -> list[int]:
        """Every class of the stream, in stage order."""
        return [c for s in self.stages for c in s.classes]


def stage_classes(num_classes: int, classes_per_stage: int = 2, stages: list[list[int]] | None = None,
                  class_order_seed: int | None = None, present: set[int] | None = None,
                  class_order: list[int] | str | None = None, seed: int = 0) -> list[list[int]]:
    """The classes of each stage: `stages` as given, or the class order cut in chunks. The order is the
    natural one, shuffled by `class_order_seed`, or `class_order` (a list, a named order, or `seed`: shuffled
    with the run's `seed`)."""
    present = set(range(num_classes)) if present is None else present
    if stages is not None:
        for i, stage in enumerate(stages):
            for c in stage:
                if c not in present:
                    raise ConfigError(f"data.stages[{i}]: class {c} has no samples in this source; "
                                      f"classes present: {sorted(present)}")
        return [list(s) for s in stages]
    order = sorted(present)
    shuffle_seed = seed if class_order == SEEDED_ORDER else class_order_seed
    if shuffle_seed is not None:
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed))
        order = [order[i] for i in perm.tolist()]
    elif class_order is not None:
        name = class_order if isinstance(class_order, str) else None
        order = list(CLASS_ORDERS[name]) if name else list(class_order)
        missing = [c for c in order if c not in present]
        if missing:
            raise ConfigError(f"data.class_order{' ' + name if name else ''}: class {missing[0]} has no samples in "
                              f"this source; classes present: {sorted(present)}")
    if classes_per_stage > len(order):
        raise ConfigError(f"data.classes_per_stage: {classes_per_stage} exceeds the {len(order)} classes present")
    return [order[i:i + classes_per_stage] for i in range(0, len(order), classes_per_stage)]


def validation_rows(y: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A boolean mask over `y`: round(fraction * n_c) random samples of every class c (at least one, and never
    a class's last training sample), so the held-out part has the training part's class proportions."""
    held = torch.zeros(len(y), dtype=torch.bool)
    if fraction <= 0:
        return held
    for c in torch.unique(y).tolist():  # sorted: the draw does not depend on the order samples come in
        rows = (y == c).nonzero().flatten()
        count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held[rows[torch.randperm(len(rows), generator=gen)[:count]]] = True
    return held


def make_stream(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                num_classes: int, classes: list[list[int]], validation: float = 0.0, seed: int = 0) -> Stream:
    """Split train and test tensors into the stages whose classes `classes` lists; with `validation` > 0, hold
    out that fraction of each stage's training samples per class (drawn from a seed derived from `seed`)."""
    stages = []
    for i, cls in enumerate(classes):
        c = torch.tensor(cls)
        tr = torch.isin(y_train, c)
        te = torch.isin(y_test, c)
        x, y = x_train[tr], y_train[tr]
        if validation > 0:
            held = validation_rows(y, validation, torch.Generator().manual_seed(stage_seed(seed, i, "validation")))
            stages.append(Stage(i, tuple(cls), x[~held], y[~held], x_test[te], y_test[te], x[held], y[held]))
        else:
            stages.append(Stage(i, tuple(cls), x, y, x_test[te], y_test[te]))
    return Stream(stages, num_classes)


def domain_slices(y: torch.Tensor, num_domains: int, seed: int) -> list[torch.Tensor]:
    """Sorted row indices of `num_domains` disjoint, class-stratified slices of `y` covering it: every class's
    samples shuffled (from a seed derived from `seed`) and dealt out in near-equal parts."""
    gen = torch.Generator().manual_seed(stage_seed(seed, 0, "domains"))
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_domains)]
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().flatten()
        if len(rows) < num_domains:
            raise ConfigError(f"data.num_domains: class {c} has {len(rows)} training sample(s), fewer than the "
                              f"{num_domains} domains; accepted: at most {len(rows)} domains for this source")
        rows = rows[torch.randperm(len(rows), generator=gen)]
        for d, chunk in enumerate(torch.tensor_split(rows, num_domains)):
            parts[d].append(chunk)
    return [torch.cat(p).sort().values for p in parts]


def make_stage_stream(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], num_classes: int,
                      validation: float = 0.0, seed: int = 0) -> Stream:
    """A stream whose stage s is `parts[s]` = (x_train, y_train, x_test, y_test) as given, every class allowed in
    every stage (domain and user streams); validation is held out of each stage's training part as in
    make_stream."""
    stages = []
    for i, (x, y, x_te, y_te) in enumerate(parts):
        classes = tuple(torch.unique(y).tolist())
        if validation > 0:
            held = validation_rows(y, validation, torch.Generator().manual_seed(stage_seed(seed, i, "validation")))
            stages.append(Stage(i, classes, x[~held], y[~held], x_te, y_te, x[held], y[held]))
        else:
            stages.append(Stage(i, classes, x, y, x_te, y_te))
    return Stream(stages, num_classes, axis="domain")


def blur(stream: Stream, fraction: float, seed: int = 0) -> Stream:
    """The blurry stream (Aljundi et al. 2019; Koh et al. 2022): round(fraction * n_c) random training samples
    of each class c of each stage move out of it, dealt in turn to the other stages, the next stage first
    (stage i's k-th moved sample goes to stage (i + 1 + k mod (T - 1)) mod T); each stage keeps its own
    remaining samples first, then what it received, in stage order. Classes, validation and test sets stay
    per stage. Seeded (from `seed`, per stage); fraction 0, or a single stage, returns the stream as it is."""
    T = len(stream)
    if fraction <= 0 or T < 2:
        return stream
    kept: list[torch.Tensor] = []
    received: list[list[torch.Tensor]] = [[] for _ in range(T)]  # rows of stage i's x_train going to stage j
    for i, stage in enumerate(stream):
        gen = torch.Generator().manual_seed(stage_seed(seed, i, "blurry"))
        y = stage.y_train
        moved: list[torch.Tensor] = []
        for c in torch.unique(y).tolist():  # sorted: the draw does not depend on the order samples come in
            rows = (y == c).nonzero().flatten()
            moved.append(rows[torch.randperm(len(rows), generator=gen)[:round(fraction * len(rows))]])
        out = torch.cat(moved)
        stays = torch.ones(len(y), dtype=torch.bool)
        stays[out] = False
        kept.append(stays.nonzero().flatten())
        to = (i + 1 + torch.arange(len(out)) % (T - 1)) % T
        for j in range(T):
            received[j].append(out[to == j])
    stages = []
    for j, stage in enumerate(stream):
        parts = [(stage.x_train[kept[j]], stage.y_train[kept[j]])]
        parts += [(src.x_train[received[j][i]], src.y_train[received[j][i]]) for i, src in enumerate(stream)]
        stages.append(Stage(stage.index, stage.classes, torch.cat([x for x, _ in parts]),
                            torch.cat([y for _, y in parts]), stage.x_test, stage.y_test, stage.x_val, stage.y_val))
    return Stream(stages, stream.num_classes, stream.axis)
