"""The rehearsal memory: budget, per-class quota, selection, checkpoints, and experience replay that works."""
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import digits_config
from workloads.config import ConfigError, parse_run_config
from workloads.rehearsal import RehearsalMemory, Replay, herding
from workloads.runner import rebuild_learner, run_stream


def _stream_through(memory: RehearsalMemory, stages: list[list[int]], per_class: int, seed: int = 0):
    """Feed a memory synthetic stages the way the runner does; yield after each stage."""
    gen = torch.Generator().manual_seed(seed)
    for classes in stages:
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = torch.randn(len(y), 3) + y[:, None].float()
        memory.begin_stage(classes, gen)
        if memory.selection == "reservoir":
            for i in range(0, len(y), 16):
                memory.offer(x[i:i + 16], y[i:i + 16], gen)
        memory.end_stage(x, y, classes, lambda v: v, gen)
        yield classes


@pytest.mark.parametrize("selection", ["random", "reservoir", "herding"])
def test_memory_keeps_its_budget_and_the_per_class_quota(selection):
    memory = RehearsalMemory(50, selection, num_classes=10)
    stages = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    seen = []
    for classes in _stream_through(memory, stages, per_class=40):
        seen += classes
        quota = 50 // len(seen)
        counts = memory.class_counts()
        assert len(memory) <= 50
        assert set(counts) == set(seen)  # every class seen so far stays represented...
        assert all(n == min(quota, 40) for n in counts.values())  # ...with exactly its quota
        assert len(memory) == sum(counts.values())
    assert len(memory) == 50  # 10 classes x 5: nothing lost to rounding here


@pytest.mark.parametrize("selection", ["random", "herding", "reservoir"])
def test_old_classes_keep_the_full_budget_while_a_stage_trains(selection):
    memory = RehearsalMemory(100, selection, num_classes=4)
    next(_stream_through(memory, [[0, 1]], per_class=60))
    gen = torch.Generator().manual_seed(1)
    memory.begin_stage([2, 3], gen)
    if selection == "reservoir":  # fills online during the stage, so it makes room for the new classes up front
        assert memory.class_counts() == {0: 25, 1: 25}
        return
    assert memory.class_counts() == {0: 50, 1: 50}  # replay draws on the whole memory during stage 2...
    y = torch.tensor([2, 3]).repeat_interleave(60)
    memory.end_stage(torch.randn(len(y), 3), y, [2, 3], lambda v: v, gen)
    assert memory.class_counts() == {0: 25, 1: 25, 2: 25, 3: 25}  # ...and is cut to the new quota after it
    assert len(memory) == 100 and memory.classes == [0, 1, 2, 3] and memory.quota == 25


def test_memory_smaller_than_a_class_keeps_what_it_can():
    memory = RehearsalMemory(7, "random", num_classes=4)
    for _ in _stream_through(memory, [[0, 1], [2, 3]], per_class=3):
        pass
    assert memory.quota == 1 and memory.class_counts() == {0: 1, 1: 1, 2: 1, 3: 1} and len(memory) == 4


def test_reservoir_gives_every_sample_of_a_class_the_same_chance():
    hits = torch.zeros(100)
    for trial in range(300):
        memory = RehearsalMemory(10, "reservoir", num_classes=1)
        gen = torch.Generator().manual_seed(trial)
        memory.begin_stage([0], gen)
        x = torch.arange(100, dtype=torch.float32)[:, None]
        for i in range(0, 100, 10):
            memory.offer(x[i:i + 10], torch.zeros(10, dtype=torch.long), gen)
        hits[memory.x[:, 0].long()] += 1
    rate = hits / 300  # each sample should be kept with probability 10 / 100
    assert abs(rate[:50].mean() - 0.1) < 0.02 and abs(rate[50:].mean() - 0.1) < 0.02
    assert (hits > 0).sum() > 90  # early and late samples alike end up in the memory


def test_replay_keeps_learner_ready_inputs_slot_for_slot_with_the_memory():
    x, labels = torch.arange(200, dtype=torch.float32)[:, None], torch.arange(200) % 2
    memory = RehearsalMemory(4, "reservoir", num_classes=2)
    gen = torch.Generator().manual_seed(0)
    memory.begin_stage([0, 1], gen)
    slots, rows = memory.offer(x, labels, gen)  # 200 samples, 4 slots: many samples pass through one slot
    # each slot once, with the row it holds now: an indexed write with a repeated index keeps any of its values
    assert len(set(slots.tolist())) == len(slots) and torch.equal(memory.x[slots], x[rows])
    memory = RehearsalMemory(4, "reservoir", num_classes=2)
    memory.begin_stage([0, 1], gen)
    replay = Replay(memory, lambda v: v * 2, ratio=1.0, device=torch.device("cpu"))
    for i in range(0, 200, 100):
        replay.offer(x[i:i + 100], x[i:i + 100] * 2, labels[i:i + 100], gen)
        assert torch.equal(replay.inputs[:len(memory)], memory.x * 2)


def test_herding_picks_the_samples_whose_mean_tracks_the_class_mean():
    torch.manual_seed(0)
    feats = torch.randn(200, 16) + 3.0
    unit = torch.nn.functional.normalize(feats.double(), dim=1)
    order = herding(feats, 10)
    assert len(set(order.tolist())) == 10
    assert int(order[0]) == int((unit - unit.mean(0)).norm(dim=1).argmin())  # first pick: nearest the mean
    herd_gap = (unit[order].mean(0) - unit.mean(0)).norm()
    random_gaps = [(unit[torch.randperm(200)[:10]].mean(0) - unit.mean(0)).norm() for _ in range(50)]
    assert herd_gap < min(random_gaps)


@pytest.mark.parametrize("selection", ["herding", "reservoir"])
def test_memory_round_trips_through_a_checkpoint_and_resumes_exactly(selection):
    config = digits_config({"name": "mlp", "hidden": 64}, rehearsal={"memory_size": 60, "selection": selection},
                           epochs=5, lr=0.1)
    states, sizes = [], []
    full = run_stream(config, on_stage_end=lambda i, m, s: (states.append(s), sizes.append(m["memory_size"])))
    assert sizes == [60, 60, 60, 56, 60]  # the effective size, reported per stage: quotas 30, 15, 10, 7, 6
    buffer = io.BytesIO()
    torch.save(states[2], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    memory = rebuild_learner(config, loaded).memory
    saved = states[2]["learner"]["memory"]
    assert torch.equal(memory.x, saved["x"]) and torch.equal(memory.y, saved["y"])
    assert torch.equal(memory.offered, saved["offered"])
    assert memory.classes == saved["classes"] == [0, 1, 2, 3, 4, 5]
    resumed = run_stream(config, resume_state=loaded)
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix


def test_experience_replay_lifts_the_mlp_on_digits():
    mlp = {"name": "mlp", "hidden": 128}
    plain = run_stream(digits_config(mlp, epochs=20, batch_size=32, lr=0.05)).metrics["test/average_accuracy"]
    replay = run_stream(digits_config(mlp, rehearsal={"memory_size": 200}, epochs=20, batch_size=32,
                                      lr=0.05)).metrics["test/average_accuracy"]
    assert replay >= plain + 0.2, (plain, replay)


@pytest.mark.parametrize("learner", [{"name": "linear"}, {"name": "dkvb", "num_codebooks": 16, "num_keys": 64}])
def test_every_learner_takes_a_memory(learner):
    result = run_stream(digits_config(learner, rehearsal={"memory_size": 100, "selection": "reservoir"}, epochs=3))
    assert result.metrics["test/average_accuracy"] > 0.3


@pytest.mark.parametrize("rehearsal, message", [
    ({"memory_size": -1}, "rehearsal.memory_size: must be >= 0"),
    ({"memory_size": 10, "replay_ratio": -0.5}, "rehearsal.replay_ratio: must be >= 0"),
    ({"memory_size": 10, "selection": "fifo"}, "rehearsal.selection: got 'fifo'; accepted: one of 'random'"),
])
def test_bad_rehearsal_settings_name_the_key(rehearsal, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"rehearsal": rehearsal})


def test_asking_for_a_replay_learner_points_at_the_rehearsal_block():
    with pytest.raises(ConfigError, match=r"experience replay is any learner with a memory.*rehearsal: \{memory_size"):
        parse_run_config({"learner": {"name": "replay"}})


def _check_copies(rank: int, init_file: str, differ: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    memory = RehearsalMemory(4, "random", num_classes=2)
    gen = torch.Generator().manual_seed(0)
    memory.begin_stage([0, 1], gen)
    x = torch.arange(8, dtype=torch.float32)[:, None] + (1.0 if differ and rank == 1 else 0.0)
    memory.end_stage(x, torch.tensor([0, 1] * 4), [0, 1], lambda v: v, gen)
    try:
        memory.check_across()
        verdict = "same"
    except RuntimeError:
        verdict = "differ"
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(verdict)
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_workers_notice_when_their_memories_are_not_one_global_memory(differ):
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_check_copies, args=(os.path.join(out, "init"), differ, out), nprocs=2)
        verdicts = {open(os.path.join(out, f"rank{r}")).read() for r in range(2)}
    assert verdicts == {"differ" if differ else "same"}


def _recording_builder(runner):
    """(labels, builder): a replacement for runner.build_learner whose learners append the labels of every batch
    they observe, in order, to `labels`."""
    batches, build = [], runner.build_learner

    def wrapped(*args):
        learner = build(*args)
        observe = learner.observe
        learner.observe = lambda x, y: (batches.append(y.clone().cpu()), observe(x, y))[1]
        return learner

    return batches, wrapped


def _observed(monkeypatch) -> list[torch.Tensor]:
    """Labels of every batch the run's learner observes, in order (the learner's observe wrapped)."""
    import workloads.runner as runner

    batches, wrapped = _recording_builder(runner)
    monkeypatch.setattr(runner, "build_learner", wrapped)
    return batches


@pytest.mark.parametrize("selection", ["random", "reservoir"])
def test_join_walks_the_stage_and_the_memory_together_once_per_epoch(monkeypatch, selection):
    from workloads.runner import prepare

    batches = _observed(monkeypatch)
    config = digits_config({"name": "mlp", "hidden": 32}, epochs=2, batch_size=64,
                           rehearsal={"memory_size": 60, "selection": selection, "mode": "join"})
    prepared = prepare(config)
    ends, held = [], []  # observe calls so far, and the memory's labels, at each stage's end
    run_stream(config, prepared=prepared,
               on_stage_end=lambda i, m, s: (ends.append(len(batches)), held.append(s["learner"]["memory"]["y"])))
    start, memory = 0, torch.zeros(0, dtype=torch.long)
    for stage, end, after in zip(prepared.stream, ends, held):
        if selection == "reservoir":  # the memory as it stands at the stage's start: old classes cut to the quota
            quota = 60 // (2 * (stage.index + 1))
            memory = torch.cat([memory[memory == c][:quota] for c in torch.unique(memory).tolist()] or [memory])
        n, m = len(stage.y_train), len(memory)
        steps = end - start
        assert steps == 2 * -(-(n + m) // 64)  # ceil((stage data + memory) / batch) steps per epoch
        seen = torch.cat(batches[start:end])
        # every stage sample and every memory sample once per epoch: old classes' labels reach stage 2 on
        expected = torch.cat([stage.y_train, memory]).repeat(2)
        assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(expected, minlength=10))
        start, memory = end, after
    assert len(memory) == 60  # reservoir still fills online (the stage's own samples), random picks at the end


def test_mix_keeps_its_steps_and_draws_replay_into_each_batch(monkeypatch):
    from workloads.runner import prepare

    batches = _observed(monkeypatch)
    config = digits_config({"name": "mlp", "hidden": 32}, epochs=1, batch_size=64,
                           rehearsal={"memory_size": 60, "replay_ratio": 0.5})
    prepared = prepare(config)
    ends = []
    run_stream(config, prepared=prepared, on_stage_end=lambda i, m, s: ends.append(len(batches)))
    n = len(prepared.stream[1].y_train)
    stage2 = batches[ends[0]:ends[1]]
    assert len(stage2) == -(-n // 64) and len(stage2[0]) == 64 + 32  # 32 replayed per 64 new
    assert set(torch.cat(stage2).tolist()) >= set(prepared.stream[0].classes)


@pytest.mark.parametrize("mode, selection", [("mix", "herding"), ("join", "reservoir")])
def test_a_distributed_memory_on_one_worker_is_the_global_memory(mode, selection):
    rehearsal = {"memory_size": 60, "selection": selection, "mode": mode}
    runs = {}
    for distributed in (False, True):
        states = []
        config = digits_config({"name": "mlp", "hidden": 32}, epochs=3,
                               rehearsal={**rehearsal, "distributed": distributed})
        runs[distributed] = run_stream(config, on_stage_end=lambda i, m, s: states.append(s)), states[-1]
    (plain, plain_state), (own, own_state) = runs[False], runs[True]
    assert own.test.accuracy_matrix == plain.test.accuracy_matrix
    slots = own_state["learner"]["memory"]["workers"]  # one slot per worker
    assert len(slots) == 1 and torch.equal(slots[0]["x"], plain_state["learner"]["memory"]["x"])


@pytest.mark.parametrize("rehearsal, train, message", [
    ({"mode": "join", "replay_ratio": 0.5}, {}, r"rehearsal.replay_ratio: 0.5 applies to rehearsal.mode: mix only"),
    ({"mode": "blend"}, {}, r"rehearsal.mode: got 'blend'; accepted: one of 'mix', 'join'"),
    ({"mode": "join", "selection": "reservoir"}, {"task_free": True, "epochs": 1},
     r"train.task_free: rehearsal.mode: join joins the memory to a stage's data at the stage's start"),
])
def test_join_settings_that_cannot_work_name_the_keys(rehearsal, train, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"rehearsal": {"memory_size": 10, **rehearsal}, "train": train})


def _toy2d_memory(mode: str, selection: str, epochs: int):
    """toy2d (no scikit-learn to import in each worker) in 4 stages, a distributed memory of 40."""
    return parse_run_config({
        "data": {"source": "toy2d", "stages": [[0, 4], [1, 5], [2, 6], [3, 7]]},
        "learner": {"name": "mlp", "hidden": 16},
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": "sgd", "lr": 0.3},
        "rehearsal": {"memory_size": 40, "selection": selection, "mode": mode, "distributed": True}})


RUNS = (("join", "reservoir", 2), ("mix", "herding", 1))


def _two_workers(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    import workloads.runner as runner

    batches, runner.build_learner = _recording_builder(runner)
    report = {}
    for mode, selection, epochs in RUNS:
        config = _toy2d_memory(mode, selection, epochs)
        states, ends, own, reported = [], [], [], []
        batches.clear()
        full = run_stream(config, on_stage_end=lambda i, m, s: (
            states.append(s), ends.append(len(batches)), own.append(runner_memory(s, rank)),
            reported.append(m["memory_size"])))
        resumed = run_stream(config, resume_state=states[1]) if mode == "join" else full
        report[mode] = {"matrix": full.test.accuracy_matrix, "resumed": resumed.test.accuracy_matrix,
                        "ends": ends, "labels": [torch.cat(batches[a:b]) for a, b in zip([0] + ends, ends)],
                        "own": own, "state": states[1], "reported": reported}
    torch.save(report, os.path.join(out, f"rank{rank}"))
    dist.destroy_process_group()


def runner_memory(state: dict, rank: int) -> dict:
    """This worker's slot of a distributed memory's checkpoint state."""
    return state["learner"]["memory"]["workers"][rank]


def test_distributed_memories_hold_a_share_each_from_their_own_shard_and_resume():
    from workloads.runner import prepare

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_two_workers, args=(os.path.join(out, "init"), out), nprocs=2)
        ranks = [torch.load(os.path.join(out, f"rank{r}"), weights_only=True) for r in range(2)]
    stream = prepare(_toy2d_memory(*RUNS[0])).stream
    for mode, _, epochs in RUNS:
        runs = [r[mode] for r in ranks]
        assert runs[0]["matrix"] == runs[1]["matrix"]  # one model, trained on both workers' shards
        assert all(r["resumed"] == r["matrix"] for r in runs)  # join: each worker resumed with its own memory
        assert runs[0]["ends"] == runs[1]["ends"]  # both took the same number of steps
        assert runs[0]["reported"] == [sum(len(r["own"][i]["y"]) for r in runs) for i in range(len(stream))]
        for rank, run in enumerate(runs):
            for mine in run["own"]:
                assert len(mine["y"]) <= 20 and mine["size"] == 20  # memory_size // workers each
            last = run["own"][-1]
            assert len(last["y"]) == 16  # 8 classes x 2
            shard = torch.cat([s.x_train[rank::2] for s in stream])
            other = torch.cat([s.x_train[1 - rank::2] for s in stream])
            # every sample this worker holds comes from its own shard of the stages' data, none from the other's
            assert all((shard == row).all(1).any() and not (other == row).all(1).any() for row in last["x"])
        slots = runs[0]["state"]["learner"]["memory"]["workers"]
        assert [torch.equal(slot["x"], run["own"][1]["x"]) for slot, run in zip(slots, runs)] == [True, True]
        for i, stage in enumerate(stream):  # over both workers, each epoch walks the stage's data once...
            seen = torch.cat([r["labels"][i] for r in runs])
            assert set(seen.tolist()) == set(c for s in stream[:i + 1] for c in s.classes)
            if mode == "join":  # ...and both memories (reservoir cuts old classes at the stage's start)
                quota = 20 // (2 * (i + 1))
                held = sum(int(torch.bincount(r["own"][i - 1]["y"]).clamp(max=quota).sum()) for r in runs) if i else 0
                assert len(seen) == epochs * (len(stage.y_train) + held)
    merged = rebuild_learner(_toy2d_memory(*RUNS[0]), ranks[0]["join"]["state"]).memory  # one process: the union
    assert len(merged) == sum(len(runner_memory(ranks[0]["join"]["state"], r)["y"]) for r in range(2))


@pytest.mark.parametrize("distributed", [False, True])
def test_two_workers_split_each_joined_batch_between_them(monkeypatch, distributed):
    """Without processes: each rank's view of the epoch (world() patched), put together, is the whole epoch."""
    import types

    import workloads.distributed
    import workloads.rehearsal
    import workloads.runner as runner
    from workloads.runner import epoch_batches

    x = torch.arange(10, dtype=torch.float32)[:, None]
    stage = types.SimpleNamespace(x_train=x, y_train=torch.arange(10) % 2)
    replays = []
    for rank in range(2):
        for module in (workloads.distributed, workloads.rehearsal, runner):
            monkeypatch.setattr(module, "world", lambda rank=rank: (rank, 2))
        memory = RehearsalMemory(6, "random", num_classes=4, distributed=distributed)
        gen = torch.Generator().manual_seed(0)
        memory.begin_stage([2, 3], gen)
        y = torch.tensor([2, 3] * 6)
        memory.end_stage(torch.arange(100, 112, dtype=torch.float32)[:, None] + 100 * rank, y, [2, 3],
                         lambda v: v, gen)
        replays.append(Replay(memory, lambda v: v, 1.0, torch.device("cpu"), join=True))
    if not distributed:
        replays[1] = replays[0]  # one global memory: every worker holds the same
    monkeypatch.setattr(runner, "gather", lambda n: [len(r.memory) for r in replays])
    views = []
    for rank in range(2):
        for module in (workloads.distributed, workloads.rehearsal, runner):
            monkeypatch.setattr(module, "world", lambda rank=rank: (rank, 2))
        epoch = epoch_batches(stage, x, stage.y_train, 4, replays[rank])
        views.append([b[0][:, 0].tolist() for b in epoch(torch.Generator().manual_seed(1), False)])
    memories = [r.memory.x[:, 0].tolist() for r in (replays if distributed else replays[:1])]
    everything = sorted(x[:, 0].tolist() + sum(memories, []))
    assert len(views[0]) == len(views[1]) == -(-len(everything) // 4)  # the same steps on both workers
    assert sorted(sum(views[0] + views[1], [])) == everything  # each sample in one worker's share, once
    if distributed:  # a worker replays only its own memory
        assert all(v < 10 or v in memories[rank] for rank in range(2) for b in views[rank] for v in b)
