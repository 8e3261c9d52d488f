"""Input shifts for domain-incremental streams: stage s sees the data under shift s.

A shift is a name from SHIFTS and an amount: `data.shift: {name, step}` applies amount s * step at stage s
(stage 0 is the unshifted data), `data.shifts: [{name, value}, ...]` gives each stage its own. Vector shifts
take (N, D) tensors, image shifts (N, C, H, W) ones; each keeps the input's dtype, so uint8 images stay uint8
and the backbone's transform sees what it always sees. Random shifts draw from their own `seed`, never from
the run's, so every run of a sweep sees the same domains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from workloads.config import ConfigError, ShiftConfig


@dataclass(frozen=True)
class Shift:
    """One stage's shift: what to apply, how much, and the seed of its random draws."""

    name: str
    amount: float
    seed: int
    stage: int
    severity: int | None = None  # `corruption` only: ImageNet-C severity 1..5 (0: none)
    corruption: str | None = None

    def describe(self) -> dict:
        """What identifies the shifted inputs (part of the feature cache's keys)."""
        return {"name": self.name, "amount": self.amount, "seed": self.seed, "stage": self.stage,
                "severity": self.severity, "corruption": self.corruption}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spec = SHIFTS[self.name]
        if spec.images and x.dim() != 4:
            raise ConfigError(f"data.shift: {self.name} shifts images (N, C, H, W); this source gives inputs of "
                              f"shape {tuple(x.shape[1:])}; accepted for vectors: {', '.join(vector_shifts())}")
        if not spec.images and x.dim() != 2:
            x2 = x.flatten(1)  # vector shifts act on the flattened input, then it takes its shape back
            return spec.apply(x2, self).reshape(x.shape)
        return spec.apply(x, self)


@dataclass(frozen=True)
class ShiftSpec:
    """A registered shift: its function, and whether it needs images."""

    apply: Callable[[torch.Tensor, Shift], torch.Tensor]
    images: bool


SHIFTS: dict[str, ShiftSpec] = {}


def register_shift(name: str, images: bool):
    """Decorator: add a shift to the SHIFTS registry."""
    def deco(fn):
        SHIFTS[name] = ShiftSpec(fn, images)
        return fn
    return deco


def vector_shifts() -> list[str]:
    """The names of the shifts that take vectors (N, D), sorted."""
    return sorted(n for n, s in SHIFTS.items() if not s.images)


def _gen(shift: Shift) -> torch.Generator:
    # each domain draws from its shift's seed and its own index: domains differ, runs repeat
    return torch.Generator().manual_seed((shift.seed * 1_000_003 + shift.stage) % 2**63)


def _float(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn on x as floats, cast back (uint8 rounded and clipped)."""
    out = fn(x.float())
    if x.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(x.dtype)


@register_shift("none", images=False)
def _none(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    return x


@register_shift("permutation", images=False)
def _permutation(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    if shift.amount == 0:  # stage 0 of `shift: {name: permutation}` is the data as it is
        return x
    return x[:, torch.randperm(x.shape[1], generator=_gen(shift))]


@register_shift("drift", images=False)
def _drift(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    # one fixed random direction (drawn from the seed alone), travelled further at every stage
    direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(shift.seed))
    return _float(x, lambda v: v + shift.amount * direction)


@register_shift("scale", images=False)
def _scale(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    return _float(x, lambda v: v * (1 + shift.amount))


@register_shift("noise", images=False)
def _noise(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    return _float(x, lambda v: v + shift.amount * torch.randn(v.shape, generator=_gen(shift)))


@register_shift("rotation", images=True)
def _rotation(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    return rotate(x, shift.amount, interpolation=InterpolationMode.BILINEAR)


@register_shift("contrast", images=True)
def _contrast(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    from torchvision.transforms.functional import adjust_contrast

    factor = 1 + shift.amount  # < 1 washes out, > 1 sharpens; 0 is a flat grey image
    if factor < 0:
        raise ConfigError(f"data.shift: contrast {shift.amount:g} at stage {shift.stage} gives a negative factor; "
                          "accepted: amounts >= -1")
    if x.shape[1] == 1:  # adjust_contrast's grey mean is per image, which holds for one channel too
        mean = x.float().mean(dim=(1, 2, 3), keepdim=True)
        return _float(x, lambda v: (mean + factor * (v - mean)).clamp(0, 255 if x.dtype == torch.uint8 else 1))
    return adjust_contrast(x, factor)


@register_shift("colour", images=True)
def _colour(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    from torchvision.transforms.functional import adjust_hue

    if x.shape[1] != 3:
        raise ConfigError("data.shift: colour shifts the hue of RGB images; this source's images have "
                          f"{x.shape[1]} channel(s); accepted for grey images: rotation, contrast, blur")
    hue = (shift.amount + 0.5) % 1.0 - 0.5  # a turn of the colour wheel, in (-0.5, 0.5] as torchvision takes it
    return adjust_hue(x, hue)


@register_shift("blur", images=True)
def _blur(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    sigma = shift.amount
    if sigma <= 0:
        return x
    # 3 sigma each side, but reflect padding needs a kernel narrower than twice the image
    largest = 2 * min(x.shape[-2:]) - 1
    size = min(2 * math.ceil(3 * sigma) + 1, largest if largest % 2 else largest - 1)
    return _float(x, lambda v: gaussian_blur(v, [size, size], [sigma, sigma]))


@register_shift("corruption", images=True)
def _corruption(x: torch.Tensor, shift: Shift) -> torch.Tensor:
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise ConfigError("data.shift: corruption needs the imagecorruptions package (pip install "
                          "'clorch[corruptions]')") from None
    import numpy as np

    severity = shift.severity
    if not severity:
        return x
    if min(x.shape[-2:]) < 32:
        raise ConfigError(f"data.shift: corruption needs images of at least 32 x 32 pixels (imagecorruptions); "
                          f"this source's are {x.shape[-2]} x {x.shape[-1]}; accepted for small images: rotation, "
                          "contrast, blur (or source digits_32: the digits at 32 x 32)")
    # imagecorruptions takes (H, W, C) uint8 images and draws from numpy's global generator: seed it per stage
    state = np.random.get_state()
    np.random.seed((shift.seed * 1_000_003 + shift.stage) % 2**32)
    try:
        u8 = x if x.dtype == torch.uint8 else (x.clamp(0, 1) * 255).round().to(torch.uint8)
        out = []
        for img in u8.permute(0, 2, 3, 1).numpy():
            rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
            try:
                c = np.asarray(corrupt(rgb, corruption_name=shift.corruption, severity=severity))
            except Exception as e:  # an unknown name, or a corruption broken by the installed numpy (fog)
                raise ConfigError(f"data.shift.corruption: {shift.corruption!r} failed in imagecorruptions "
                                  f"({type(e).__name__}: {e}); accepted: gaussian_noise, shot_noise, impulse_noise, "
                                  "defocus_blur, motion_blur, contrast, jpeg_compression, ...") from None
            c = np.clip(c, 0, 255).astype(np.uint8)[: img.shape[0], : img.shape[1]]
            out.append(c[..., :1] if img.shape[2] == 1 else c)
    finally:
        np.random.set_state(state)
    t = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    return t if x.dtype == torch.uint8 else (t.float() / 255).to(x.dtype)


def stage_shifts(num_stages: int, shift: ShiftConfig | None, shifts: list[ShiftConfig] | None) -> list[Shift]:
    """The shift of each of `num_stages` stages, from `data.shift` (amount s * step) or `data.shifts`."""
    if shifts is not None:
        return [_make(cfg, s, cfg.value if cfg.value is not None else 0.0, f"data.shifts[{s}]", cfg.severity)
                for s, cfg in enumerate(shifts)]
    if shift is None:
        return [Shift("none", 0.0, 0, s) for s in range(num_stages)]
    step = shift.step if shift.step is not None else (1.0 if shift.name in ("permutation", "corruption") else None)
    if step is None:
        raise ConfigError(f"data.shift.step: {shift.name} needs a step (the amount added at each stage)")
    return [_make(shift, s, s * step, "data.shift", s)
            for s in range(num_stages)]


def _make(cfg: ShiftConfig, stage: int, amount: float, where: str, severity: int | None) -> Shift:
    if cfg.name not in SHIFTS:
        raise ConfigError(f"{where}.name: unknown shift {cfg.name!r}; accepted: {', '.join(sorted(SHIFTS))}")
    if cfg.name == "corruption":
        if not cfg.corruption:
            raise ConfigError(f"{where}.corruption: name an ImageNet-C corruption (e.g. gaussian_noise, "
                              "motion_blur, fog)")
        if severity is not None and not 0 <= severity <= 5:
            raise ConfigError(f"{where}.severity: stage {stage} would get severity {severity}; accepted: 0..5 "
                              "(fewer stages, or data.shifts with a severity each)")
        return Shift(cfg.name, amount, cfg.seed, stage, int(severity or 0), cfg.corruption)
    return Shift(cfg.name, float(amount), cfg.seed, stage)
