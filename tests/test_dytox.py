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


def _learner(preset: str, stages: int):
    config = parse_run_config({"preset": preset})
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
            assert torch.equal(learner.task_tokens[-1].data, learner.task_tokens[-2].data)  # starts as a copy
            assert not learner.task_tokens[-2].requires_grad and not any(
                p.requires_grad for p in learner.heads[-2].parameters())  # old tokens and classifiers frozen


def test_the_cifar100_models_have_the_papers_size():
    # DyTox on CIFAR-100 (Table 2 of the paper): 10.73M, 10.74M, 10.77M parameters after 10, 20, 50 stages
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


@pytest.mark.slow
def test_tiny_dytox_beats_finetuning_without_memory_on_digits():
    dytox = run_stream(_tiny()).metrics["test/average_accuracy"]
    finetune = run_stream(parse_run_config({
        "data": {"source": "digits", "classes_per_stage": 2}, "backbone": {"name": "small_cnn"},
        "learner": {"name": "finetune"},
        "train": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 30}})).metrics["test/average_accuracy"]
    assert dytox > finetune + 0.3, (dytox, finetune)


@pytest.mark.parametrize("raw, message", [
    ({"backbone": {"name": "small_cnn"}}, "dytox is its own image encoder; set backbone.name: identity"),
    ({"data": {"source": "toy2d"}}, "dytox needs images"),
    ({"learner": {"name": "dytox", "patch_size": 3}}, "learner.patch_size: 3 must divide the image size 8x8"),
    ({"learner": {"name": "dytox", "embed_dim": 30, "heads": 4}}, "must be divisible by learner.heads"),
])
def test_bad_dytox_settings_say_what_to_change(raw, message):
    with pytest.raises(ConfigError, match=message):
        run_stream(_tiny(**raw))


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
                               "train": {"epochs": 1}})
    states = []
    result = run_stream(config, on_stage_end=lambda i, m, s: states.append(m["memory_size"]))
    assert len(result.test.accuracy_matrix) == 50 and result.stages[1] == [2, 3]
    # 2 training images per class, one held out for validation, the other kept
    assert max(states) <= 2000 and states[-1] == 100
