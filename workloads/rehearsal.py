"""Rehearsal: a replay memory with one global budget, a per-class quota, and three ways to choose what stays.

Budget: `memory_size` samples in all, never per worker. Global (the default), data-parallel workers each hold
the same full memory: they walk the same full batches with the same seeds, and herding's picks are broadcast
from rank 0. Distributed (rehearsal.distributed, DyTox's erratum: its paper's numbers used it), worker r holds a
memory of its own, memory_size // workers samples chosen (by the same rules) from rows r::workers of each
stage's training data only, replays only from it (draws and reservoir offers with a generator of its own), and
the workers check only that together they keep the budget. One worker's distributed memory is the global one.
A checkpoint carries every worker's memory (gathered into one slot per rank); on resume worker r loads slot r,
and one process (a model rebuilt for prediction, or a resume on one worker) their union.
Replay (rehearsal.mode):
  mix   each batch of new samples gets replay_ratio as many drawn from the memory (uniformly, with replacement);
  join  the memory joins the stage's training data and each epoch walks both, shuffled together, in batches of
        train.batch_size: ceil((stage + memory) / batch) steps (the official DyTox code's way: its memory is
        concatenated to the stage's data set); replay_ratio does not apply (a non-default one is refused), nor
        does train.task_free (no stage start to join at). The memory joined is the memory as
        it stands at the stage's start (after reservoir's cut below); reservoir still takes the stage's samples
        online in the first epoch, for the later stages. Distributed, the epoch walks the stage's data and every
        worker's memory: each worker takes its share of a batch's stage samples and that batch's samples of its
        own memory, so every worker takes the same number of steps.
Quota: memory_size // classes seen (a stage's classes count from its start) per class; when the classes held
are cut to it depends on the selection (below).
Selection:
  random     at the end of a stage, a uniformly random subset of each new class;
  reservoir  online, in the stage's first epoch: each sample is offered once as the stream presents it, and
             the k-th sample of class c takes a random slot of c's reservoir with probability quota / k
             (algorithm R, one reservoir per class), so replay can draw the stage's own samples too;
  herding    at the end of a stage, iCaRL's herding on the learner's features: greedily, the sample that keeps
             the running mean of the chosen ones closest to the class mean.
When the quota shrinks, the classes already held are cut to it: random and herding keep their first picks
(their order is their priority), and only at the end of the stage, right before the new classes' picks go in,
so the stage replays the full budget (as iCaRL and DyTox do); reservoir keeps a uniformly random subset, cut at
the start of the stage, since it fills the freed room online while the stage trains.
A class that comes back in a later stage (domain streams; a blurry stream's class seen early through a few
samples, then in its own stage) shares its room between its stages: random and herding keep up to k / (k + 1)
of it for its k earlier stages (their first picks) and pick the rest from the new stage, so a class seen early
through a few samples is topped up; reservoir's per-class draw already spans every stage the class was
offered in.

The memory holds inputs as the stream gives them to the learner (embeddings of a frozen backbone, or
transformed images), on the CPU; `Replay` keeps the learner-ready form of the same rows for one stage.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from workloads.config import ConfigError
from workloads.distributed import broadcast, gather, same_across, sum_across, world

SELECTIONS = ("random", "reservoir", "herding")


class RehearsalMemory:
    """At most `size` (input, label) pairs over all classes seen so far, `size // classes seen` per class
    (distributed: this worker's share, size // workers, of the budget)."""

    def __init__(self, size: int, selection: str, num_classes: int, distributed: bool = False):
        if size <= 0:
            raise ValueError(f"a rehearsal memory needs a positive size, got {size}")
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; accepted: {', '.join(SELECTIONS)}")
        # distributed: this worker's memory, a share of the budget chosen from its own shard of the data
        self.distributed = distributed
        self.rank, self.workers = world() if distributed else (0, 1)
        if size < self.workers:
            raise ConfigError(f"rehearsal.memory_size: {size} samples cannot be shared by {self.workers} "
                              "data-parallel workers (rehearsal.distributed: true); accepted: at least one each")
        self.budget, self.size, self.selection = size, size // self.workers, selection
        self._x: torch.Tensor | None = None  # (size, ...) slots; the first `len(self)` hold samples
        self._y = torch.full((self.size,), -1, dtype=torch.long)
        self._n = 0
        self.classes: list[int] = []  # seen so far, in order of arrival
        self.offered = torch.zeros(num_classes, dtype=torch.long)  # reservoir: samples of each class offered
        self.picked = torch.zeros(num_classes, dtype=torch.long)  # random / herding: stages that picked each class

    def __len__(self) -> int:
        return self._n

    @property
    def x(self) -> torch.Tensor | None:
        return None if self._x is None else self._x[:self._n]

    @property
    def y(self) -> torch.Tensor:
        return self._y[:self._n]

    @property
    def quota(self) -> int:
        """Samples each seen class may keep."""
        return self.size // max(len(self.classes), 1)

    def class_counts(self) -> dict[int, int]:
        """Samples held per class."""
        labels, counts = torch.unique(self.y, return_counts=True)
        return dict(zip(labels.tolist(), counts.tolist()))

    def begin_stage(self, classes: list[int], generator: torch.Generator) -> None:
        """A stage's classes arrive and the quota shrinks; reservoir cuts the classes it holds now (see end_stage)."""
        self.classes += [c for c in classes if c not in self.classes]
        if self.selection == "reservoir":  # it fills online during the stage, so it needs the room up front
            self._cut(generator)

    def offer(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
              announce: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Reservoir: stream a batch past the memory; returns (slots written, rows of the batch written there).
        `announce` (task-free): a class not seen yet joins here, the quota shrinks and held classes are cut."""
        if announce:
            new = [c for c in dict.fromkeys(y.tolist()) if c not in self.classes]  # in order of appearance
            if new:
                self.begin_stage(new, generator)
        q = self.quota
        draws = torch.rand(len(y), generator=generator).tolist()
        slots_of: dict[int, list[int]] = {}
        written: dict[int, int] = {}  # slot -> row of the batch now held there (a later row overwrites)
        for row, (c, u) in enumerate(zip(y.tolist(), draws)):
            if c not in slots_of:
                if c not in self.classes:
                    raise ValueError(f"class {c} was offered before a stage announced it (begin_stage)")
                slots_of[c] = (self.y == c).nonzero().flatten().tolist()
            self.offered[c] += 1
            held = slots_of[c]
            if len(held) < q:
                slot = self._n
                self._n += 1
                held.append(slot)
            else:
                j = int(u * int(self.offered[c]))  # uniform in [0, offered)
                if j >= q:
                    continue
                slot = held[j]
            self._write(slot, x[row], c)
            written[slot] = row
        slots = torch.tensor(list(written), dtype=torch.long)
        return slots, torch.tensor(list(written.values()), dtype=torch.long)

    def end_stage(self, x: torch.Tensor, y: torch.Tensor, classes: list[int],
                  features: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator) -> None:
        """Random and herding: cut the old classes to the quota (they kept the full budget for the stage's
        replay), then choose each arriving class's `quota` samples from the stage's (x, y); a class held
        already (seen at earlier stages) shares its room between them and this stage (see the module's note)."""
        if self.selection == "reservoir":
            return
        if self.distributed:  # each worker chooses from its own rows, so the workers hold distinct samples
            x, y = x[self.rank::self.workers], y[self.rank::self.workers]
        self._cut(generator)
        q = self.quota
        for c in classes:
            rows = (y == c).nonzero().flatten()
            if not len(rows):
                continue
            take, k = q, int(self.picked[c])
            if k:  # seen at k earlier stages (a domain stream's class coming back, or a class a blurry stream
                #    showed early): those stages keep up to k / (k + 1) of its room, this stage fills the rest
                held = (self.y == c).nonzero().flatten()
                keep_old = min(len(held), q * k // (k + 1))
                drop = torch.zeros(self._n, dtype=torch.bool)
                drop[held[keep_old:]] = True  # the first picks stay, as when the quota shrinks
                self._keep((~drop).nonzero().flatten())
                take = q - keep_old
            self.picked[c] += 1
            if self.selection == "random":
                pick = rows[torch.randperm(len(rows), generator=generator)[:take]]
            else:
                pick = rows[herding(features(x[rows]), take)]
                if not self.distributed:
                    broadcast(pick)  # features differ in the last bits across machines: rank 0 decides
            for row in pick.tolist():
                self._write(self._n, x[row], c)
                self._n += 1

    def digest(self) -> torch.Tensor:
        """A few float64 sums that change with any sample, label or slot order (to compare copies)."""
        if self._n == 0:
            return torch.zeros(4, dtype=torch.float64)
        x = self.x.double().flatten(1)
        position = torch.arange(1, self._n + 1, dtype=torch.float64)
        return torch.stack([torch.tensor(float(self._n)), self.y.double().sum(), x.sum(), (x.sum(1) * position).sum()])

    def check_across(self) -> int:
        """Raise unless the data-parallel workers' memories agree: every worker holds this same memory (global),
        or together they hold at most the budget (distributed); returns the samples held, over all workers."""
        if not self.distributed:
            if not same_across(self.digest()):
                raise RuntimeError("rehearsal memories differ across data-parallel workers; the memory must be "
                                   "global")
            return len(self)
        held = int(sum_across(torch.tensor([float(len(self))], dtype=torch.float64)))
        if held > self.budget:
            raise RuntimeError(f"the data-parallel workers' memories hold {held} samples together, over the "
                               f"budget of {self.budget}")
        return held

    def state(self) -> dict:
        """Tensors and lists only: safe for `torch.load(weights_only=True)`. Distributed: every worker's memory
        (a collective: every worker calls it), one slot per rank, so that any rank's checkpoint holds them all."""
        own = {"size": self.size, "selection": self.selection, "x": self.x, "y": self.y.clone(),
               "classes": list(self.classes), "offered": self.offered.clone(), "picked": self.picked.clone()}
        if not self.distributed:
            return own
        return {"size": self.budget, "selection": self.selection, "workers": gather(own)}

    def load_state(self, state: dict) -> None:
        """Restore what `state` returned; the budget and the selection must match this memory's. Distributed:
        worker r takes slot r, and one process (a model rebuilt for prediction, or a resume on one worker)
        takes the union of the slots, which fits its budget."""
        slots = state.get("workers")
        if (slots is not None) != self.distributed:
            kinds = {True: "one memory per worker (rehearsal.distributed: true)",
                     False: "one global memory (rehearsal.distributed: false)"}
            raise ValueError(f"the checkpoint's rehearsal memory is {kinds[slots is not None]}; "
                             f"this run's is {kinds[self.distributed]}")
        if slots is not None:
            if (state["size"], state["selection"]) != (self.budget, self.selection):
                raise ValueError(f"the checkpoint's memory is {state['size']} samples chosen by "
                                 f"{state['selection']}; this run's is {self.budget} by {self.selection}")
            if len(slots) == self.workers:
                state = slots[self.rank]
            elif self.workers == 1:
                state = _union(slots, self.size)
            else:
                raise ValueError(f"the checkpoint holds the memories of {len(slots)} data-parallel workers; this "
                                 f"run has {self.workers}: resume on {len(slots)} workers (or on one: it takes "
                                 "their union)")
        if (state["size"], state["selection"]) != (self.size, self.selection):
            raise ValueError(f"the checkpoint's memory is {state['size']} samples chosen by {state['selection']}; "
                             f"this run's is {self.size} by {self.selection}")
        self._x, self._n = None, 0
        self._y.fill_(-1)
        self.classes = list(state["classes"])
        self.offered = state["offered"].clone()
        picked = state.get("picked")  # older checkpoints: each class held was picked in one stage
        self.picked = picked.clone() if picked is not None else torch.zeros_like(self.offered)
        if picked is None:
            self.picked[torch.tensor(sorted(set(state["y"].tolist())), dtype=torch.long)] = 1
        for row, c in enumerate(state["y"].tolist()):
            self._write(row, state["x"][row], c)
        self._n = len(state["y"])

    def _write(self, slot: int, x: torch.Tensor, label: int) -> None:
        if self._x is None:
            self._x = torch.zeros((self.size, *x.shape), dtype=x.dtype)
        self._x[slot] = x.cpu()
        self._y[slot] = label

    def _cut(self, generator: torch.Generator) -> None:
        """Cut each class held to the quota: reservoir keeps a random subset, random and herding their first picks."""
        q = self.quota
        keep = []
        for c in torch.unique(self.y).tolist():
            slots = (self.y == c).nonzero().flatten()
            if len(slots) > q:
                chosen = torch.randperm(len(slots), generator=generator)[:q] if self.selection == "reservoir" \
                    else torch.arange(q)
                slots = slots[chosen]
            keep.append(slots)
        if keep:
            self._keep(torch.cat(keep).sort().values)

    def _keep(self, slots: torch.Tensor) -> None:
        """Keep only these slots, in this order, at the front."""
        n = len(slots)
        if self._x is not None:
            self._x[:n] = self._x[slots].clone()
        self._y[:n] = self._y[slots].clone()
        self._y[n:] = -1
        self._n = n


def _union(slots: list[dict], size: int) -> dict:
    """One memory's state holding every worker's samples (rank order) and counts."""
    xs = [s["x"] for s in slots if s["x"] is not None]
    return {"size": size, "selection": slots[0]["selection"], "x": torch.cat(xs) if xs else None,
            "y": torch.cat([s["y"] for s in slots]),
            "classes": list(dict.fromkeys(c for s in slots for c in s["classes"])),
            "offered": torch.stack([s["offered"] for s in slots]).sum(0),
            "picked": torch.stack([s["picked"] for s in slots]).amax(0)}


def herding(features: torch.Tensor, count: int) -> torch.Tensor:
    """iCaRL herding: indices of `count` rows of (m, F) features, each chosen to keep the mean of the chosen
    (L2-normalised) rows closest to the mean of all; in order of choice."""
    f = F.normalize(features.double(), dim=1)
    mean = f.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mean)
    free = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(count, len(f)) + 1):
        gap = (mean - (total + f) / k).norm(dim=1)
        gap[~free] = float("inf")
        i = int(gap.argmin())
        chosen.append(i)
        free[i] = False
        total += f[i]
    return torch.tensor(chosen, dtype=torch.long)


class Replay:
    """The memory as one stage's training loop uses it: learner-ready inputs kept slot for slot with the memory
    (`prepare` is the learner's `stage_inputs`), drawn `ratio` per new sample into each batch, or (`join`)
    joined to the stage's data as it stands at the stage's start.
    `generator`: this worker's own for draws and offers (a distributed memory on several workers, whose draws
    differ); None: the stage's batch generator, which every worker draws alike."""

    def __init__(self, memory: RehearsalMemory, prepare: Callable[[torch.Tensor], torch.Tensor], ratio: float,
                 device: torch.device, announce: bool = False, join: bool = False,
                 generator: torch.Generator | None = None):
        self.memory, self.prepare, self.ratio, self.device = memory, prepare, ratio, device
        self.announce = announce  # task-free: classes join the memory as the stream first shows them
        self.join, self.generator = join, generator
        self.inputs: torch.Tensor | None = None  # (memory.size, ...) learner-ready rows, slot for slot
        if len(memory):
            self._store(torch.arange(len(memory)), prepare(memory.x.to(device)))

    @property
    def online(self) -> bool:
        """Whether the memory takes samples while the stage trains (reservoir)."""
        return self.memory.selection == "reservoir"

    def offer(self, x: torch.Tensor, inputs: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Reservoir: offer a full batch (stream inputs `x`, their learner-ready `inputs`, labels `y`)."""
        cut = self.announce and any(c not in self.memory.classes for c in torch.unique(y).tolist())
        slots, rows = self.memory.offer(x, y, self.generator or generator, announce=self.announce)
        if cut:  # the memory moved its rows to the front: refresh every slot's learner-ready copy
            self.inputs = None
            if len(self.memory):
                self._store(torch.arange(len(self.memory)), self.prepare(self.memory.x.to(self.device)))
        elif len(slots):
            self._store(slots, inputs[rows.to(inputs.device)])

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This process's replay for a batch of `batch` new samples: round(batch * ratio) samples drawn uniformly
        (with replacement) from the memory, every size-th of them (a global memory, which every worker draws
        alike), or this worker's share of them drawn from its own memory (distributed); None if none."""
        k = round(batch * self.ratio)
        rank, size = world()
        if self.memory.distributed:
            k = len(range(rank, k, size))
        if k == 0 or len(self.memory) == 0:
            return None
        idx = torch.randint(len(self.memory), (k,), generator=self.generator or generator)
        x, y = self.inputs[idx.to(self.inputs.device)], self.memory.y[idx].to(self.device)
        return (x, y) if self.memory.distributed else (x[rank::size], y[rank::size])

    def joined(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The memory's learner-ready inputs and labels as they stand now (rehearsal.mode: join); None if empty."""
        n = len(self.memory)
        return None if n == 0 else (self.inputs[:n], self.memory.y.to(self.device))

    def _store(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = rows.new_zeros((self.memory.size, *rows.shape[1:]))
        self.inputs[slots.to(rows.device)] = rows
