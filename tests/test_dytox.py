"""DyTox: the model grows by one task token and one classifier per stage, and it learns a stream with memory."""
import pytest
import torch

from workloads.config import ConfigError, parse_run_config
from workloads.data.streams import Stage
from workloads.learners import LearnerContext, build_learner
from workloads.runner import run_stream


def _count(*parts) -> int:
    return sum(p.numel() for part in parts for p in ([part] if isinstance(part, torch.nn.Parameter)
                                                      else part.parameters()))


def _learner(preset: str, stages: int, **learner):
    config = parse_run_config({"preset": preset, **({"learner": {"name": "dytox", **learner}} if learner else {})})
    shape = (3, 32, 32) if preset.startswith("dytox_cifar100") else (1, 8, 8)
    num_classes = 100 if preset.startswith("dytox_cifar100") else 10
    ctx = LearnerContext(num_classes=num_classes, input_dim=int(torch.tensor(shape).prod()), train=config.train,
                         seed=0, device=torch.device("cpu"), input_shape=shape)
    learner = build_learner(config.learner, ctx)
    per = num_classes // stages
    return learner, [Stage(i, tuple(range(i * per, (i + 1) * per)), *[torch.empty(0)] * 4) for i in range(stages)]


@pytest.mark.parametrize("preset, stages", [("dytox_tiny", 5), ("dytox_cifar100_10", 10)])
def test_each_stage_adds_one_task_token_and_one_classifier(preset, stages):
    learner, stream = _learner(preset, stages)
    D = learner.options.embed_dim
    encoder, tab = _count(*learner.encoder_modules()), _count(learner.tab)
    previous = None
    for stage in stream:
        learner.begin_stage(stage)
        learner.end_stage(stage, is_last=False)
        assert _count(*learner.encoder_modules()) == encoder and _count(learner.tab) == tab
        assert len(learner.task_tokens) == stage.index + 1 and len(learner.heads) == stage.index + 1
        new = len(stage.classes)
        total = _count(learner) - (_count(learner.div_head) if learner.div_head is not None else 0)
        if previous is not None:
            # exactly a D-dimensional token, and a LayerNorm(D) + Linear(D, new classes) classifier
            assert total - previous == D + (2 * D) + (D * new + new)
            assert _count(learner.div_head) == 2 * D + D * (new + 1) + (new + 1)  # replaced, not accumulated
        previous = total
        if stage.index:
            # a fresh token (truncated normal, std 0.02, as the official code draws it), not the last one's copy
            assert not torch.equal(learner.task_tokens[-1].data, learner.task_tokens[-2].data)
            assert not learner.task_tokens[-2].requires_grad and not any(
                p.requires_grad for p in learner.heads[-2].parameters())  # old tokens and classifiers frozen


def test_new_token_copy_starts_each_stage_from_the_last_token():
    learner, stream = _learner("dytox_tiny", 5, new_token="copy")
    learner.begin_stage(stream[0])
    with torch.no_grad():
        learner.task_tokens[0].add_(1.0)  # as if the first stage had trained it
    learner.begin_stage(stream[1])
    assert torch.equal(learner.task_tokens[1].data, learner.task_tokens[0].data)


def test_the_cifar100_models_have_the_papers_size():
    # DyTox on CIFAR-100 (Table 2 of the paper): 10.73M, 10.74M, 10.77M parameters after 10, 20, 50 stages.
    # GPSA blocks (the default) have no q/k/v biases and add a 3 -> heads positional projection and a gate per
    # head: 5 x (12 x 5 - 3 x 384) = -5460 parameters against plain attention, well inside the tolerance.
    for stages, paper in [(10, 10.73), (20, 10.74), (50, 10.77)]:
        learner, stream = _learner(f"dytox_cifar100_{stages}", stages)
        for stage in stream:
            learner.expand(list(stage.classes))
        total = (_count(learner) - _count(learner.div_head)) / 1e6
        assert abs(total - paper) < 0.03, (stages, total)


def test_presets_name_the_papers_settings():
    config = parse_run_config({"preset": "dytox_cifar100_20"})
    o = config.learner
    assert (o.embed_dim, o.depth, o.heads, o.patch_size) == (384, 5, 12, 4)
    assert config.data.source == "cifar100" and config.data.classes_per_stage == 5
    assert config.rehearsal.memory_size == 2000 and config.rehearsal.selection == "herding"


def test_forward_scores_only_the_classes_seen_so_far_without_the_divergence_head():
    learner, stream = _learner("dytox_tiny", 5)
    learner.begin_stage(stream[0])
    learner.begin_stage(stream[1])
    images = torch.rand(3, 1, 8, 8)
    logits = learner.predict(images)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits[:, :4]).all() and torch.isinf(logits[:, 4:]).all()
    with torch.no_grad():
        for p in learner.div_head.parameters():
            p.add_(1.0)
    assert torch.equal(learner.predict(images), logits)  # the divergence head plays no part at test time


def _tiny(**over):
    raw = {"preset": "dytox_tiny", **over}
    return parse_run_config(raw)


def test_resume_after_a_stage_replays_the_rest_exactly():
    config = _tiny(learner={"name": "dytox", "depth": 1, "finetune_epochs": 2}, train={"epochs": 2})
    states = []
    full = run_stream(config, on_stage_end=lambda i, m, s: states.append(s))
    resumed = run_stream(config, resume_state=states[1])
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
    assert states[-1]["learner"]["stage_classes"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_mixup_trains_on_mixed_batches():
    quick = {"name": "dytox", "depth": 1, "finetune_epochs": 1}
    plain = run_stream(_tiny(learner=quick, train={"epochs": 3}))
    mixed = run_stream(_tiny(learner={**quick, "mixup": True}, train={"epochs": 3}))
    assert mixed.test.accuracy_matrix != plain.test.accuracy_matrix  # DyTox+ saw other inputs and targets...
    assert mixed.test.accuracy_matrix[0][0] > 0.8  # ...and still learned the first stage


@pytest.mark.parametrize("raw, message", [
    ({"backbone": {"name": "small_cnn"}}, "dytox is its own image encoder; set backbone.name: identity"),
    ({"data": {"source": "toy2d"}}, "dytox needs images"),
    ({"learner": {"name": "dytox", "patch_size": 3}}, "learner.patch_size: 3 must divide the image size 8x8"),
    ({"learner": {"name": "dytox", "embed_dim": 30, "heads": 4}}, "must be divisible by learner.heads"),
    ({"learner": {"name": "dytox", "drop_path": 1.0}}, r"learner.drop_path: must be in \[0, 1\), got 1.0"),
    ({"learner": {"name": "dytox", "mixup_smoothing": -0.1}}, r"learner.mixup_smoothing: must be in \[0, 1\)"),
    ({"learner": {"name": "dytox", "sab": "msa"}}, "learner.sab"),
    ({"learner": {"name": "dytox", "kd_reduction": "sum"}}, "learner.kd_reduction"),
])
def test_bad_dytox_settings_say_what_to_change(raw, message):
    with pytest.raises(ConfigError, match=message):
        run_stream(_tiny(**raw))


def test_gpsa_on_non_square_images_says_to_use_mhsa():
    config = parse_run_config({"preset": "dytox_tiny"})
    ctx = LearnerContext(num_classes=10, input_dim=128, train=config.train, seed=0, device=torch.device("cpu"),
                         input_shape=(1, 8, 16))
    with pytest.raises(ConfigError, match="learner.sab: gpsa needs square images .* got 8x16; use sab: mhsa"):
        build_learner(config.learner, ctx)
    assert build_learner(parse_run_config({"preset": "dytox_tiny", "learner": {"name": "dytox", "sab": "mhsa"}})
                         .learner, ctx) is not None


def test_task_attention_in_one_pass_equals_one_token_at_a_time():
    from workloads.learners.dytox import TaskAttentionBlock

    torch.manual_seed(0)
    tab = TaskAttentionBlock(48, 4, 4.0)
    tokens, patches = torch.randn(3, 48), torch.randn(5, 16, 48)
    assert torch.allclose(tab(tokens, patches), tab.one_token_at_a_time(tokens, patches), atol=1e-5)


def test_the_cifar100_50_stage_preset_runs_end_to_end_on_a_cifar100_release(tmp_path):
    from conftest import write_cifar

    write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", 200, 100, "meta",
                b"fine_label_names", cycle=True)
    # the preset's stream, memory and schedule shape, with a smaller model and one epoch to stay quick
    config = parse_run_config({"preset": "dytox_cifar100_50", "data": {"root": str(tmp_path), "download": False},
                               "learner": {"name": "dytox", "embed_dim": 24, "depth": 1, "heads": 2,
                                           "finetune_epochs": 1},
                               "train": {"epochs": 1, "warmup_epochs": 0}})
    states = []
    result = run_stream(config, on_stage_end=lambda i, m, s: states.append(m["memory_size"]))
    assert len(result.test.accuracy_matrix) == 50 and result.stages[:2] == [[87, 0], [52, 58]]  # DER's order
    # 2 training images per class, one held out for validation, the other kept
    assert max(states) <= 2000 and states[-1] == 100


@pytest.mark.parametrize("stages", [10, 20, 50])
def test_the_cifar100_presets_carry_the_official_recipe(stages):
    """main.py and options/model/cifar_dytox.yaml of the official code: lr 5e-4 and fine-tuning lr 5e-5, each x
    batch 128 x 2 GPUs / 512; cosine with 5 warm-up epochs from 1e-6 to 1e-5; memory 2000 joined to the stage's
    data, split over the GPUs; DER's class order; GPSA blocks, drop-path 0.1, the augmentation of build_transform."""
    from workloads.config import scaled_lr
    from workloads.data.orders import CLASS_ORDERS

    config = parse_run_config({"preset": f"dytox_cifar100_{stages}"})
    t, o, r = config.train, config.learner, config.rehearsal
    assert scaled_lr(t, t.lr) == pytest.approx(2.5e-4) and scaled_lr(t, o.finetune_lr) == pytest.approx(2.5e-5)
    assert (t.batch_size, t.epochs, t.optimizer, t.weight_decay) == (256, 500, "adamw", 1e-6)
    assert (t.schedule, t.warmup_epochs, t.warmup_lr, t.min_lr) == ("cosine", 5, 1e-6, 1e-5)
    assert (t.augment.crop_padding, t.augment.flip, t.augment.rand_augment, t.augment.normalize) == \
        (4, True, "rand-m9-mstd0.5-inc1", "cifar100")
    assert (r.memory_size, r.selection, r.mode, r.distributed) == (2000, "herding", "join", True)
    assert CLASS_ORDERS[config.data.class_order][:4] == [87, 0, 52, 58]
    assert (o.sab, o.drop_path, o.kd_reduction, o.new_token, o.finetune_epochs) == ("gpsa", 0.1, "mean", "fresh", 20)
    # the learner's fine-tuning optimiser runs at the scaled rate
    learner, _ = _learner(f"dytox_cifar100_{stages}", stages)
    learner.expand(list(range(100 // stages)))
    assert learner.make_optimizer(o.finetune_lr).param_groups[0]["lr"] == pytest.approx(2.5e-5)


def test_distillation_averages_the_kl_divergence_over_batch_and_old_classes():
    from workloads.learners.dytox import distillation

    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])  # (B=2, old=3) logits
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    T = 2.0
    p_new, p_old = (student / T).softmax(1), (teacher / T).softmax(1)
    kl_sum = float((p_old * (p_old.log() - p_new.log())).sum())
    # the official code: F.kl_div(..., reduction="mean") * T^2, the sum divided by B x old classes
    assert distillation(student, teacher, T) == pytest.approx(kl_sum / (2 * 3) * T * T, rel=1e-5)
    assert distillation(student, teacher, T, "batchmean") == pytest.approx(kl_sum / 2 * T * T, rel=1e-5)
    # the first row by hand: p_old = softmax([1, 0, 0]), p_new = softmax([0.5, 0, -0.5])
    e = 2.718281828459045
    po = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    z = e ** 0.5 + 1 + e ** -0.5
    pn = [e ** 0.5 / z, 1 / z, e ** -0.5 / z]
    import math
    row = sum(a * (math.log(a) - math.log(b)) for a, b in zip(po, pn))
    assert distillation(student[:1], teacher[:1], T) == pytest.approx(row / 3 * T * T, rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_the_learners_loss_distils_with_the_chosen_reduction(reduction):
    import torch.nn.functional as F

    learner, stream = _learner("dytox_tiny", 5, drop_path=0.0, div_weight=0.0, kd_temperature=2.0,
                               kd_reduction=reduction)
    learner.begin_stage(stream[0])
    learner.begin_stage(stream[1])  # a teacher now, and 2 old classes of 4 seen
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 2, 3])
    learner.train()
    with torch.no_grad():
        z = learner.seen_logits(learner.embeddings(x))
        z_old = learner.teacher.seen_logits(learner.teacher.embeddings(x))
    p_new, p_old = (z[:, :2] / 2).softmax(1), (z_old / 2).softmax(1)
    kd = (p_old * (p_old.log() - p_new.log())).sum() / (6 * (2 if reduction == "mean" else 1)) * 4
    clf = F.binary_cross_entropy_with_logits(z, F.one_hot(y, 4).float())
    assert learner.observe(x, y) == pytest.approx(float(0.5 * clf + 0.5 * kd), rel=1e-5)


def test_a_gpsa_block_with_its_gate_closed_is_plain_attention():
    from workloads.learners.dytox import gpsa_block

    torch.manual_seed(0)
    block = gpsa_block(32, 4, 4.0, drop_path=0.0, locality_strength=1.0)
    attn = block.attn
    with torch.no_grad():
        attn.gating_param.fill_(-40.0)  # sigmoid ~ 4e-18: the positional scores play no part
    x = torch.randn(3, 16, 32)  # (B, N = a 4x4 grid, D)
    B, N, D, h = 3, 16, 32, 4
    q, k = attn.qk(x).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
    v = attn.v(x).view(B, N, h, D // h).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) / (D // h) ** 0.5).softmax(-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(attn(x), expected, atol=1e-6)
    # and with the gate open (its initial state) the positional part does change the attention
    with torch.no_grad():
        attn.gating_param.fill_(1.0)
    assert not torch.allclose(attn(x), expected, atol=1e-3)


def test_drop_path_rises_over_the_blocks_and_is_off_at_evaluation():
    learner, stream = _learner("dytox_tiny", 5, drop_path=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in [*learner.blocks, learner.tab]]
    assert rates == pytest.approx([0.0, 0.15, 0.3])  # linear from 0 to drop_path over depth + 1 blocks
    learner.begin_stage(stream[0])
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(learner.predict(images), learner.predict(images))  # deterministic at evaluation
    learner.train()
    torch.manual_seed(0)
    assert not torch.equal(learner(images), learner(images))  # stochastic in training


def test_new_parameters_round_trip_through_the_learners_state():
    learner, stream = _learner("dytox_tiny", 5)
    for stage in stream[:2]:
        learner.begin_stage(stage)
    with torch.no_grad():
        learner.blocks[0].attn.gating_param.add_(0.5)
    restored, _ = _learner("dytox_tiny", 5)
    restored.load_state({**learner.state(), "optimizer": None})
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(restored.predict(images), learner.predict(images))
    assert torch.equal(restored.blocks[0].attn.gating_param, learner.blocks[0].attn.gating_param)


def test_mixup_smooths_then_mixes_with_the_reversed_batch_and_replays_under_a_seed():
    from workloads.learners.dytox import mixup

    x, targets = torch.arange(4.0).view(4, 1), torch.eye(4)[[0, 1, 2, 3]]
    torch.manual_seed(3)
    mx, mt = mixup(x, targets, 0.8, 0.1)
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(0.8, 0.8).sample())
    smooth = targets * 0.9 + 0.1 / 4  # timm: off = 0.1 / 4, on = 1 - 0.1 + off
    assert torch.allclose(mx, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(mt, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(mt.sum(1), torch.ones(4))
    torch.manual_seed(3)
    assert torch.equal(mixup(x, targets, 0.8, 0.1)[1], mt)  # torch's generator alone decides


def test_mixup_runs_in_balanced_fine_tuning_too(monkeypatch):
    from types import SimpleNamespace

    from workloads.learners import dytox

    mixed = []
    real = dytox.mixup
    monkeypatch.setattr(dytox, "mixup", lambda x, t, *a: mixed.append(t.sum(0)) or real(x, t, *a))
    learner, stream = _learner("dytox_tiny", 5, mixup=True, finetune_epochs=2)
    learner.begin_stage(stream[0])
    learner.begin_stage(stream[1])
    learner.memory = SimpleNamespace(x=torch.rand(40, 1, 8, 8), y=torch.arange(4).repeat(10),
                                     distributed=False)  # 10 per class
    learner.balanced_finetune(1)
    # 2 epochs of 40 memory samples in batches of 32: 4 mixed batches, over the 4 seen classes
    assert len(mixed) == 4 and torch.equal(sum(mixed), torch.full((4,), 20.0))
    assert learner.blocks.training is False and learner.tab.training  # the frozen blocks ran in eval mode


@pytest.mark.slow
def test_tiny_gpsa_dytox_beats_finetuning_without_memory_on_digits():
    # 15 epochs instead of the preset's 30 keep both runs under 30 s; GPSA is the default, named here all the same
    dytox = run_stream(_tiny(learner={"name": "dytox", "sab": "gpsa"}, train={"epochs": 15}))
    finetune = run_stream(parse_run_config({
        "data": {"source": "digits", "classes_per_stage": 2}, "backbone": {"name": "small_cnn"},
        "learner": {"name": "finetune"},
        "train": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 15}}))
    dytox, finetune = dytox.metrics["test/average_accuracy"], finetune.metrics["test/average_accuracy"]
    assert dytox > finetune + 0.3, (dytox, finetune)


def _finetune_uneven_memories(rank: int, init_file: str, out: str) -> None:
    """One of two gloo workers: a tiny DyTox whose distributed memory holds 10 samples on rank 0 and 6 on rank 1
    (rank 1's rows are short of the quota), then its balanced fine-tuning; writes how many steps it took."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = parse_run_config({"preset": "dytox_tiny", "train": {"batch_size": 4},
                               "learner": {"name": "dytox", "embed_dim": 8, "depth": 1, "heads": 2,
                                           "finetune_epochs": 2},
                               "rehearsal": {"memory_size": 20, "selection": "random", "distributed": True}})
    ctx = LearnerContext(num_classes=4, input_dim=64, train=config.train, seed=0, device=torch.device("cpu"),
                         rehearsal=config.rehearsal, input_shape=(1, 8, 8))
    learner = build_learner(config.learner, ctx)
    gen = torch.Generator().manual_seed(rank)
    # quota 10 // 2 classes = 5 per class per worker, picked from the worker's own rows (every other one)
    per_class = 10 if rank == 0 else 6
    for i, classes in enumerate([[0, 1], [2, 3]]):
        stage = Stage(i, tuple(classes), *[torch.empty(0)] * 4)
        learner.begin_stage(stage)
        if i == 0:
            y = torch.tensor(classes).repeat_interleave(per_class)
            learner.memory.begin_stage(classes, gen)
            learner.memory.end_stage(torch.rand(len(y), 1, 8, 8, generator=gen), y, classes, lambda v: v.flatten(1), gen)
    steps = []
    step = learner.step
    learner.step = lambda loss, batch: (steps.append(batch), step(loss, batch))[1]
    learner.balanced_finetune(1)
    torch.save({"memory": len(learner.memory), "steps": steps}, f"{out}/rank{rank}")
    dist.destroy_process_group()


def test_balanced_finetuning_keeps_two_workers_with_uneven_distributed_memories_in_step(tmp_path):
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(_finetune_uneven_memories, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.time() + 120
    while not context.join(timeout=5):  # a worker left waiting in an all-reduce would hang: fail instead
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two workers did not finish their balanced fine-tuning (an all-reduce left unpaired)")
    ranks = [torch.load(tmp_path / f"rank{r}", weights_only=True) for r in range(2)]
    assert [r["memory"] for r in ranks] == [10, 6]
    # the same number of batches on both (each all-reduce paired): both walk 6 samples, 2 epochs of batch 4
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2 * 2
    assert sum(ranks[0]["steps"]) == sum(ranks[1]["steps"]) == 2 * 6 // 2  # each its half of every batch
