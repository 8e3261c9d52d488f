"""Blurry stage boundaries (data.blurry) and task-free training (train.task_free) through the one stage loop."""
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from conftest import digits_config
from workloads.config import ConfigError, parse_run_config
from workloads.data.streams import Stage, blur, make_stream
from workloads.learners import LEARNERS
from workloads.learners.linear import LinearProbe
from workloads.runner import prepare, run_stream


@dataclass
class SpyOptions:
    """A linear probe that writes down every hook the runner calls."""

    name: Literal["spy"] = "spy"


class Spy(LinearProbe):
    """Records begin_stage / end_stage calls, what observe and setup receive."""

    Options = SpyOptions
    calls: list = []  # class-level: the runner builds the learner itself

    def setup(self, unlabelled):
        Spy.calls.append(("setup", unlabelled.clone()))

    def begin_stage(self, stage):
        Spy.calls.append(("begin_stage", stage))
        super().begin_stage(stage)

    def end_stage(self, stage, is_last):
        Spy.calls.append(("end_stage", stage))

    def observe(self, x, y, *rest, **named):
        Spy.calls.append(("observe", (x, y, *rest), named))
        return super().observe(x, y)


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setitem(LEARNERS, "spy", Spy)
    Spy.calls = []
    return Spy.calls


def _config(learner: dict, **extra) -> "RunConfig":
    raw = {"data": {"source": "digits", "classes_per_stage": 2, **extra.pop("data", {})}, "learner": learner,
           "train": {"epochs": 1, "batch_size": 64, "lr": 0.3, **extra.pop("train", {})}, **extra}
    return parse_run_config(raw)


def test_task_free_hands_the_learner_batches_only_and_still_scores_every_stage(spy):
    config = _config({"name": "spy"}, train={"task_free": True})
    ends = []
    result = run_stream(config, on_stage_end=lambda i, m, s: ends.append((i, m["classes"])))
    hooks = [c[0] for c in spy]
    assert "begin_stage" not in hooks and "end_stage" not in hooks  # no boundary ever reaches the learner
    observed = [c for c in spy if c[0] == "observe"]
    assert observed and all(not named and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args)
                            for _, args, named in observed)
    # one ordered stream: stage after stage, one pass (each training sample seen once)
    stream = prepare(config).stream
    stage_of = {c: s.index for s in stream for c in s.classes}
    order = [max(stage_of[c] for c in args[1].tolist()) for _, args, _ in observed]
    assert order == sorted(order) and sum(len(args[1]) for _, args, _ in observed) == sum(len(s.y_train) for s in stream)
    # the runner still knows the boundaries: T rows of T entries, on_stage_end after each stage
    T = len(stream)
    assert [len(row) for row in result.test.accuracy_matrix] == [T] * T
    assert ends == [(i, list(s.classes)) for i, s in enumerate(stream)]
    # setup (DKVB's key learning) saw the first stage's training inputs, as without task_free
    (setup,) = [c[1] for c in spy if c[0] == "setup"]
    assert torch.equal(setup, stream[0].x_train)
    spy.clear()
    run_stream(_config({"name": "spy"}))
    assert [c[0] for c in spy].count("begin_stage") == T  # the spy does see boundaries when they are given


@pytest.mark.parametrize("raw, message", [
    ({"learner": {"name": "dytox"}, "train": {"task_free": True}},
     "train.task_free: dytox needs stage boundaries .*accepted with it: train.task_free: false"),
    ({"learner": {"name": "dytox"}, "data": {"blurry": 0.1}}, "data.blurry: dytox trains one classifier per stage"),
    ({"learner": {"name": "mlp"}, "train": {"task_free": True, "epochs": 3}},
     "train.task_free: .*train.epochs must be 1, got 3"),
    ({"learner": {"name": "mlp"}, "train": {"task_free": True}, "rehearsal": {"memory_size": 50}},
     "train.task_free: rehearsal.selection 'random' chooses at stage ends.*accepted: rehearsal.selection: reservoir"),
    ({"learner": {"name": "dkvb", "prune": True}, "train": {"task_free": True}}, "train.task_free: learner.prune"),
    ({"data": {"blurry": 1.0}}, r"data.blurry: .*must lie in \[0, 1\).*got 1.0"),
    ({"data": {"blurry": -0.1}}, r"data.blurry: .*must lie in \[0, 1\)"),
])
def test_impossible_stream_modes_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_run_config(raw)
    assert "\n" not in str(caught.value)


def _synthetic_stream(validation: float = 0.0):
    counts = [30, 41, 25, 33, 50, 17]  # training samples per class; 3 stages of 2 classes
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(0))
    y_test = torch.arange(6).repeat(5)
    return make_stream(x, y, torch.randn(len(y_test), 4), y_test, 6, [[0, 1], [2, 3], [4, 5]], validation, seed=3)


def test_blurry_moves_the_fraction_of_each_stage_to_the_others():
    stream, m = _synthetic_stream(validation=0.1), 0.2
    blurry = blur(stream, m, seed=7)
    T = len(stream)
    for i, (before, after) in enumerate(zip(stream, blurry)):
        assert after.classes == before.classes  # what "classes seen" and the metrics use stays the stage's own
        assert torch.equal(after.x_test, before.x_test) and torch.equal(after.x_val, before.x_val)
        n_c = [int((before.y_train == c).sum()) for c in before.classes]
        own = torch.isin(after.y_train, torch.tensor(before.classes))
        assert int(own.sum()) == sum(n - round(m * n) for n in n_c)  # each class keeps 1 - m of its samples
        for j, other in enumerate(stream):  # ...and its share m is dealt in turn to the other stages
            if j == i:
                continue
            sent = sum(round(m * int((other.y_train == c).sum())) for c in other.classes)
            expected = sum(1 for k in range(sent) if (j + 1 + k % (T - 1)) % T == i)
            assert int(torch.isin(after.y_train, torch.tensor(other.classes)).sum()) == expected
    # nothing lost, nothing duplicated
    rows = lambda s: sorted(map(tuple, torch.cat([st.x_train for st in s]).tolist()))
    assert rows(blurry) == rows(stream)
    again, other_seed = blur(stream, m, seed=7), blur(stream, m, seed=8)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(blurry, again))
    assert not all(torch.equal(a.x_train, b.x_train) for a, b in zip(blurry, other_seed))


def test_blurry_zero_is_todays_stream():
    config = _config({"name": "linear"})
    stream = _synthetic_stream()
    assert blur(stream, 0.0) is stream
    today, zero = prepare(config).stream, prepare(_config({"name": "linear"}, data={"blurry": 0.0})).stream
    for a, b in zip(today, zero):
        assert a.classes == b.classes and torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    plain = run_stream(config)
    assert run_stream(_config({"name": "linear"}, data={"blurry": 0.0})).test.accuracy_matrix == \
        plain.test.accuracy_matrix


@pytest.mark.parametrize("selection", ["herding", "reservoir"])
def test_a_blurry_memory_keeps_its_quota_over_the_classes_it_was_shown(selection):
    config = _config({"name": "mlp", "hidden": 32}, data={"blurry": 0.3},
                     rehearsal={"memory_size": 60, "selection": selection})
    seen = []
    run_stream(config, on_stage_end=lambda i, m, s: seen.append(s["learner"]["memory"]))
    stream = prepare(config).stream
    for i, memory in enumerate(seen):
        shown = {c for s in stream[:i + 1] for c in s.y_train.tolist()}
        labels, counts = torch.unique(memory["y"], return_counts=True)
        assert set(memory["classes"]) == shown  # a class counts as seen once training data showed it
        assert set(labels.tolist()) <= shown and len(memory["y"]) <= 60
        assert int(counts.max()) <= 60 // len(shown)


@pytest.mark.parametrize("extra", [
    {"data": {"blurry": 0.25}, "rehearsal": {"memory_size": 60, "selection": "herding"}, "train": {"epochs": 3}},
    {"train": {"task_free": True}, "rehearsal": {"memory_size": 60, "selection": "reservoir"}},
], ids=["blurry", "task_free"])
def test_blurry_and_task_free_runs_resume_exactly_from_a_stage_checkpoint(extra):
    config = _config({"name": "mlp", "hidden": 32}, **extra)
    states = []
    full = run_stream(config, on_stage_end=lambda i, m, s: states.append(s))
    resumed = run_stream(config, resume_state=states[1])  # the checkpoint after stage 2
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
    assert resumed.val.accuracy_matrix == full.val.accuracy_matrix


def _task_free_dkvb(rank: int, init_file: str, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    config = _config({"name": "dkvb", "num_codebooks": 16, "num_keys": 64}, data={"validation": 0},
                     train={"task_free": True})
    usage = []
    result = run_stream(config, on_stage_end=lambda i, m, s: usage.append(int(s["learner"]["model"]
                                                                              ["bottleneck.usage"].sum())))
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        json.dump({"matrix": result.test.accuracy_matrix, "usage": usage}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_task_free_dkvb_on_two_workers_counts_key_usage_over_both():
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_task_free_dkvb, args=(os.path.join(out, "init"), out), nprocs=2)
        ranks = [json.load(open(os.path.join(out, f"rank{r}"))) for r in range(2)]
    config = _config({"name": "dkvb", "num_codebooks": 16, "num_keys": 64}, data={"validation": 0},
                     train={"task_free": True})
    usage = []
    single = run_stream(config, on_stage_end=lambda i, m, s: usage.append(int(s["learner"]["model"]
                                                                             ["bottleneck.usage"].sum())))
    assert ranks[0] == ranks[1]  # every worker holds the same counters and so masks the same keys
    assert ranks[0]["usage"] == usage  # ...the counts of all samples, as one process counts them
    assert all(abs(a - b) <= 0.01 for row, ref in zip(ranks[0]["matrix"], single.test.accuracy_matrix)
               for a, b in zip(row, ref))


ROTATED = {"source": "digits", "stream": "domain_incremental", "num_domains": 3, "shift": {"name": "rotation", "step": 30}}


def test_a_blurry_domain_stream_deals_each_domains_shifted_samples_to_the_others():
    """data.blurry on a domain stream: a domain's training samples (under its own shift) reach the other
    domains' stages; every stage keeps all classes, its own validation and its own shifted test set."""
    sharp = prepare(_config({"name": "mlp", "hidden": 32}, data=ROTATED)).stream
    blurry = prepare(_config({"name": "mlp", "hidden": 32}, data={**ROTATED, "blurry": 0.2})).stream
    assert blurry.axis == "domain" and len(blurry) == len(sharp) == 3
    for j, (s, b) in enumerate(zip(sharp, blurry)):
        assert b.classes == s.classes and torch.equal(b.x_test, s.x_test) and torch.equal(b.x_val, s.x_val)
        own = {tuple(row.tolist()) for row in s.x_train}
        others = [{tuple(row.tolist()) for row in o.x_train} for i, o in enumerate(sharp) if i != j]
        rows = [tuple(row.tolist()) for row in b.x_train]
        moved_out = sum(round(0.2 * int((s.y_train == c).sum())) for c in s.classes)
        assert sum(r in own for r in rows) == len(s.y_train) - moved_out  # it keeps the rest of its own
        received = [sum(r in o for r in rows) for o in others]
        assert all(n > 0 for n in received) and len(rows) == len(own) - moved_out + sum(received)
    assert sum(len(b.y_train) for b in blurry) == sum(len(s.y_train) for s in sharp)  # nothing lost or copied


def test_a_blurry_task_free_domain_stream_resumes_exactly_from_a_stage_checkpoint():
    config = _config({"name": "mlp", "hidden": 32}, data={**ROTATED, "blurry": 0.2}, train={"task_free": True},
                     rehearsal={"memory_size": 60, "selection": "reservoir"})
    states = []
    full = run_stream(config, on_stage_end=lambda i, m, s: states.append(s))
    assert [len(row) for row in full.test.accuracy_matrix] == [3, 3, 3]
    resumed = run_stream(config, resume_state=states[0])  # the checkpoint after domain 1
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
