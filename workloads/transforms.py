"""The training recipe of image learners, from timm: per-batch augmentation and normalisation, the cosine lr
schedule, mixed precision and the host -> device copy.

What this module may touch: `Augment.__call__` seeds the global RNGs of python `random`, numpy and torch's CPU
generator (timm's RandAugment and torchvision's transforms draw from them) and restores all three before it
returns, so code around it draws what it would have drawn without augmentation. Nothing else global. It only
ever sees training batches of learners that train their backbone, never the feature cache.

Speed: every image goes through PIL on the CPU (uint8 round trip), about what a DataLoader worker does; fine
for 128 images a batch, but on a GPU it is the step's bottleneck for a small model (bench/dytox_step.py).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from workloads.config import AugmentConfig, ConfigError, NormalizeConfig, TrainConfig

# DyTox's CIFAR-100 statistics (continual/datasets.py, build_transform) and timm's ImageNet defaults
NORMALIZE = {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
             "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def check_augment(cfg: AugmentConfig) -> None:
    """train.augment's values, without the input shape (see `Augment` for the channels)."""
    if cfg.crop_padding is not None and cfg.crop_padding < 0:
        raise ConfigError(f"train.augment.crop_padding: must be >= 0 (null: no crop), got {cfg.crop_padding}")
    if cfg.rand_augment is not None:
        from timm.data.auto_augment import rand_augment_transform

        if not cfg.rand_augment.startswith("rand"):
            raise ConfigError(f"train.augment.rand_augment: got {cfg.rand_augment!r}; accepted: a timm RandAugment "
                              "policy such as 'rand-m9-mstd0.5-inc1', or null")
        try:
            rand_augment_transform(cfg.rand_augment, {})
        except Exception as e:  # timm asserts on unknown sections
            raise ConfigError(f"train.augment.rand_augment: timm cannot read {cfg.rand_augment!r} ({e}); accepted: "
                              "e.g. 'rand-m9-mstd0.5-inc1' (magnitude 9, its std 0.5, increasing)") from None
        if cfg.color_jitter is not None:
            # timm's factory switches colour jitter off under RandAugment (so DyTox's official 0.4 never applies)
            raise ConfigError("train.augment.color_jitter: timm applies no colour jitter together with RandAugment; "
                              "accepted: null with rand_augment, or rand_augment: null")
    if cfg.color_jitter is not None and cfg.color_jitter < 0:
        raise ConfigError(f"train.augment.color_jitter: must be >= 0, got {cfg.color_jitter}")
    n = cfg.normalize
    if isinstance(n, str) and n not in NORMALIZE:
        raise ConfigError(f"train.augment.normalize: unknown set {n!r}; accepted: {', '.join(NORMALIZE)}, "
                          "{mean: [...], std: [...]} or null")
    if isinstance(n, NormalizeConfig):
        if not n.mean or len(n.mean) != len(n.std):
            raise ConfigError(f"train.augment.normalize: mean and std need one value per channel each, got "
                              f"{len(n.mean)} and {len(n.std)}")
        if min(n.std) <= 0:
            raise ConfigError(f"train.augment.normalize.std: must be > 0, got {n.std}")


def normalization(cfg: AugmentConfig, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) of shape (C, 1, 1), or None without normalisation; ConfigError if the channels differ."""
    n = cfg.normalize
    if n is None:
        return None
    mean, std = NORMALIZE[n] if isinstance(n, str) else (n.mean, n.std)
    if len(mean) != channels:
        raise ConfigError(f"train.augment.normalize: {n if isinstance(n, str) else 'mean/std'} has {len(mean)} "
                          f"channels, the images {channels}; accepted: {{mean: [...], std: [...]}} with "
                          f"{channels} values each, or null")
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)


def normalize(cfg: AugmentConfig | None, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as the learner sees them: normalised where train.augment says so."""
    stats = None if cfg is None else normalization(cfg, x.shape[1])
    return x if stats is None else (x - stats[0]) / stats[1]


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """python `random`, numpy and torch's CPU generator seeded from `seed` inside, as they were outside."""
    saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    words = np.random.SeedSequence(seed).generate_state(4)
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words)
    torch.random.default_generator.manual_seed(int(words[2]) << 32 | int(words[3]))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.default_generator.set_state(saved[2])


class Augment:
    """timm's training transform (create_transform, its random-resized crop replaced by a padded random crop as
    in DyTox's official code) applied image by image to normalised (B, C, H, W) batches."""

    def __init__(self, cfg: AugmentConfig, shape: tuple[int, ...]):
        from timm.data import create_transform
        from torchvision import transforms

        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ConfigError(f"train.augment: augments images (1 or 3 channels, H, W); the data gives {tuple(shape)}")
        channels, height, width = shape
        self.cfg, self.stats = cfg, normalization(cfg, channels)
        # RandAugment fills uncovered pixels with this colour: timm's default mean, as the official recipe had
        fill = NORMALIZE["imagenet"][0] if channels == 3 else (0.5,)
        pipeline = create_transform(input_size=(channels, height, width), is_training=True,
                                    hflip=0.5 if cfg.flip else 0.0, color_jitter=cfg.color_jitter,
                                    auto_augment=cfg.rand_augment, interpolation="bicubic", mean=fill,
                                    normalize=False).transforms
        crop = [] if cfg.crop_padding is None else [transforms.RandomCrop((height, width), padding=cfg.crop_padding)]
        self.pipeline = transforms.Compose(crop + pipeline[1:])  # [0] was RandomResizedCropAndInterpolation
        for step in pipeline:
            for op in getattr(step, "ops", ()):  # RandAugment's operations: only ours are changed, not timm's table
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Augmented copy of `x` (B, C, H, W) on x's device; the same `seed` and batch give the same output."""
        from PIL import Image

        pixels = x.detach().float().cpu()
        if self.stats is not None:
            pixels = pixels * self.stats[1] + self.stats[0]
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        with seeded_global_rngs(seed):
            out = torch.stack([self.pipeline(Image.fromarray(p[..., 0] if self.mode == "L" else p, self.mode))
                               for p in pixels]).float() / 255  # (B, C, H, W) in [0, 1]; timm gave uint8
        if self.stats is not None:
            out = (out - self.stats[0]) / self.stats[1]
        return to_device(out, x.device)


def _posterize(img, bits: int, **_):
    """timm's posterize, where keeping 0 bits gives a black image as older Pillow did (Pillow >= 11 refuses
    bits = 0, which timm's PosterizeIncreasing reaches at magnitude 10, e.g. m9 + mstd noise)."""
    from PIL import Image, ImageOps

    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)


def augment_seed(seed: int, *key: int) -> int:
    """One seed per (run seed, stage, epoch, batch, ...) from stage_seed's `augment` stream."""
    from workloads.data.streams import stage_seed

    base = stage_seed(seed, key[0], "augment")
    return int(np.random.SeedSequence([base % 2**32, base >> 32, *key[1:]]).generate_state(2, np.uint64)[0])


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`: CPU -> CUDA through pinned memory without blocking; 4-D images channels-last on
    CUDA (what cuDNN's convolutions prefer under autocast). Elsewhere `x` unchanged."""
    if device.type != "cuda":
        return x.to(device)
    if x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def resolve_precision(precision: str, device: torch.device, images: bool) -> str:
    """`fp32` or `bf16`: auto is bf16 for a learner that trains on images (`images`: its own encoder, the image
    path) on a CUDA GPU that has it, fp32 elsewhere: on CPUs, and for learners on embeddings (a DKVB's values),
    whose results stay those of fp32."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise ConfigError("train.precision: bf16, but this GPU has no bfloat16; accepted here: auto or fp32")
    if precision == "auto":
        return "bf16" if images and device.type == "cuda" and bf16_ok else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast on `device` for precision `bf16`; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, epochs: int):
    """timm's CosineLRScheduler over `epochs` epochs for train.schedule: cosine (None for constant), its lr for
    epoch 0 already set. Step it with `step(epoch)` after each epoch, as DyTox's (and DeiT's) main.py do."""
    if train.schedule == "constant":
        return None
    from timm.scheduler import CosineLRScheduler

    schedule = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=train.min_lr, warmup_t=train.warmup_epochs,
                                 warmup_lr_init=train.warmup_lr, t_in_epochs=True)
    schedule.step(0)  # an optimiser kept from the last stage (finetune) still holds that stage's last lr
    return schedule
