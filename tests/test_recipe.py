"""The image training recipe (workloads.transforms): per-batch augmentation, the cosine schedule, lr scaling,
precision; and a DyTox run with all of it on resumes exactly."""
import math
import random

import numpy as np
import pytest
import torch

from workloads.config import AugmentConfig, ConfigError, NormalizeConfig, TrainConfig, parse_run_config
from workloads.transforms import Augment, augment_seed, cosine_schedule, normalize

DIGITS_AUGMENT = {"crop_padding": 1, "normalize": {"mean": [0.5], "std": [0.5]}}


def _digit_batch(n: int = 16) -> torch.Tensor:
    x = torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 16.0
    return normalize(AugmentConfig(normalize=NormalizeConfig([0.5], [0.5])), x)  # (n, 1, 8, 8)


def test_augmentation_is_a_function_of_the_seed_and_changes_the_images():
    augment = Augment(AugmentConfig(crop_padding=1, normalize=NormalizeConfig([0.5], [0.5])), (1, 8, 8))
    x = _digit_batch()
    seed = augment_seed(0, 1, 2, 3, 0)
    first, again = augment(x, seed), augment(x, seed)
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(x, augment_seed(0, 1, 2, 4, 0)))  # the next batch draws anew
    assert not torch.equal(first, augment(x, augment_seed(1, 1, 2, 3, 0)))  # another run seed too
    assert (first != x).flatten(1).any(1).float().mean() > 0.5  # most images changed...
    assert first.shape == x.shape and first.min() >= -1 and first.max() <= 1  # ...and stay normalised images


def test_augmentation_leaves_the_global_rngs_as_it_found_them():
    augment, x = Augment(AugmentConfig(), (3, 32, 32)), torch.rand(4, 3, 32, 32)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    augment(x, 123)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_cosine_schedule_warms_up_then_decays_to_the_minimum_as_timm_computes_it():
    from timm.scheduler import CosineLRScheduler

    train = TrainConfig(epochs=20, lr=0.1, schedule="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)

    def lrs(schedule, optimizer):
        out = []
        for epoch in range(train.epochs):
            out.append(optimizer.param_groups[0]["lr"])  # what epoch `epoch` trains at
            schedule.step(epoch)
        return out

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours = lrs(cosine_schedule(opt, train, train.epochs), opt)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = CosineLRScheduler(ref_opt, t_initial=20, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)
    assert ours == lrs(ref, ref_opt)  # DyTox's main.py: the same scheduler, stepped at each epoch end
    assert ours[0] == ours[1] == 1e-6 and ours[1] < ours[3] < ours[5]  # warm-up...
    cosine = [1e-5 + 0.5 * (0.1 - 1e-5) * (1 + math.cos(math.pi * t / 20)) for t in range(5, 19)]
    assert ours[6:] == pytest.approx(cosine, rel=1e-9)  # ...then cosine over t / t_initial towards min_lr
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert ours == lrs(cosine_schedule(opt2, train, train.epochs), opt2)  # deterministic
    assert cosine_schedule(opt2, TrainConfig(), 20) is None  # constant: no scheduler


def test_lr_scales_with_the_global_batch_for_train_and_finetune_lr():
    from workloads.learners import LearnerContext, build_learner

    config = parse_run_config({"preset": "dytox_tiny", "train": {"lr_scale_batch": 512, "batch_size": 128},
                               "learner": {"name": "dytox", "finetune_lr": 4e-4}})
    ctx = LearnerContext(num_classes=10, input_dim=64, train=config.train, seed=0, device=torch.device("cpu"),
                         input_shape=(1, 8, 8))
    learner = build_learner(config.learner, ctx)
    learner.expand([0, 1])
    assert learner.make_optimizer().param_groups[0]["lr"] == pytest.approx(3e-3 * 128 / 512)
    assert learner.make_optimizer(config.learner.finetune_lr).param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("raw, message", [
    ({"train": {"augment": {"crop_padding": -1}}}, "train.augment.crop_padding: must be >= 0"),
    ({"train": {"augment": {"rand_augment": "v0"}}}, "train.augment.rand_augment: got 'v0'; accepted: a timm"),
    ({"train": {"augment": {"rand_augment": "rand-x9"}}}, "train.augment.rand_augment: timm cannot read"),
    ({"train": {"augment": {"color_jitter": 0.4}}}, "no colour jitter together with RandAugment"),
    ({"train": {"augment": {"normalize": "cifar10"}}}, "normalize: unknown set 'cifar10'; accepted: cifar100"),
    ({"train": {"augment": {"normalize": {"mean": [0.5], "std": [0.5, 0.5]}}}}, "one value per channel"),
    ({"train": {"augment": {}}, "learner": {"name": "mlp"}},
     "mlp learns on embeddings from the frozen feature cache"),
    ({"train": {"augment": {}}, "learner": {"name": "finetune"}, "data": {"source": "toy2d"}},
     "train.augment: augments images; data.source toy2d gives vectors"),
    ({"train": {"warmup_epochs": 5}}, "train.warmup_epochs: belongs to train.schedule: cosine"),
    ({"train": {"schedule": "cosine", "warmup_epochs": 40, "epochs": 30}}, r"train.warmup_epochs: must lie in \[0"),
    ({"train": {"schedule": "cosine", "min_lr": -1}}, "train.min_lr: must be >= 0"),
    ({"train": {"schedule": "cosine", "task_free": True}}, "cosine restarts at every stage"),
    ({"train": {"lr_scale_batch": 0}}, "train.lr_scale_batch: the reference batch must be a positive integer"),
    ({"train": {"lr_scale_batch": 512, "batch_size": None}}, "lr_scale_batch: scales the lr by train.batch_size"),
    ({"train": {"precision": "fp16"}}, "train.precision: got 'fp16'; accepted: one of 'auto', 'fp32', 'bf16'"),
])
def test_bad_recipe_settings_name_the_key_and_what_is_accepted(raw, message):
    base = {} if "learner" in raw else {"preset": "dytox_tiny"}  # the preset's learner keys fit dytox only
    with pytest.raises(ConfigError, match=message):
        parse_run_config({**base, **raw})


def test_normalisation_must_fit_the_images_channels():
    from workloads.runner import run_stream

    config = parse_run_config({"preset": "dytox_tiny", "train": {"augment": {"normalize": "cifar100"}}})
    with pytest.raises(ConfigError, match="normalize: cifar100 has 3 channels, the images 1"):
        run_stream(config)


def _recipe_run(stages=([0, 1], [2, 3], [4, 5]), **train):
    # a small slice of digits (test_fraction 0.7 leaves about 50 training images per class): a few seconds
    return parse_run_config({
        "preset": "dytox_tiny", "data": {"stages": list(stages), "test_fraction": 0.7},
        "learner": {"name": "dytox", "depth": 1, "finetune_epochs": 1, "mixup": True},
        "train": {"epochs": 2, "batch_size": 64, "augment": DIGITS_AUGMENT, "schedule": "cosine",
                  "warmup_epochs": 1, "warmup_lr": 1e-4, "min_lr": 1e-5, "lr_scale_batch": 32, **train}})


def test_dytox_with_augmentation_cosine_and_mixup_resumed_after_stage_2_matches_an_uninterrupted_run():
    from workloads.runner import run_stream

    config = _recipe_run()
    states, losses = [], []
    full = run_stream(config, on_stage_end=lambda i, m, s: (states.append(s), losses.append(m["loss"])))
    resumed = run_stream(config, resume_state=states[1])
    assert resumed.test.accuracy_matrix == full.test.accuracy_matrix
    assert resumed.val.accuracy_matrix == full.val.accuracy_matrix
    plain = []
    run_stream(_recipe_run(stages=[[0, 1]], augment=None), on_stage_end=lambda i, m, s: plain.append(m["loss"]))
    assert plain[0] != losses[0]  # the augmentation did reach the model


@pytest.mark.parametrize("raw", [
    {"preset": "dytox_tiny", "train": {"augment": DIGITS_AUGMENT, "schedule": "cosine", "warmup_epochs": 5}},
    {"data": {"source": "cifar10"}, "backbone": {"name": "small_cnn"}, "learner": {"name": "finetune"},
     "train": {"augment": {}, "lr_scale_batch": 512, "precision": "bf16"}},
])
def test_learners_that_train_their_backbone_take_the_recipe(raw):
    train = parse_run_config(raw).train
    assert train.augment is not None and (train.schedule == "cosine" or train.lr_scale_batch == 512)


def test_auto_precision_is_fp32_on_cpus_and_for_learners_on_embeddings():
    from workloads.transforms import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, images=True) == "fp32"  # CPU results stay those of fp32, to the bit
    assert resolve_precision("auto", cuda, images=False) == "fp32"  # a DKVB's values: never autocast unasked
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", cuda, images=True) == expected
    assert resolve_precision("bf16", cpu, images=False) == "bf16"  # asked for by name: any learner
