"""Frozen encoders in front of the learners: a registry of names, each with its input transform and output dim.

`build_backbone(cfg, input_shape)` is the one way to create them. A backbone maps transformed inputs (B, ...)
to embeddings (B, output_dim); `transform` turns a source's raw tensors (uint8 images or float vectors) into
what the backbone expects.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from workloads.config import ConfigError


class Backbone(nn.Module):
    """An encoder with its declared output dimension and input transform."""

    output_dim: int

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw source tensor -> model input; uint8 images become floats in [0, 1]."""
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class Identity(Backbone):
    """For vector data: the input, flattened, is the embedding."""

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.output_dim = int(torch.tensor(input_shape).prod())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class SmallCNN(Backbone):
    """A two-block CNN for image tests and fine-tuning on small images; random weights unless a checkpoint."""

    def __init__(self, input_shape: tuple[int, ...], width: int = 32):
        super().__init__()
        channels = input_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.output_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "identity": lambda cfg, shape: Identity(shape),
    "small_cnn": lambda cfg, shape: SmallCNN(shape),
}


def build_backbone(cfg, input_shape: tuple[int, ...]) -> Backbone:
    """The backbone a BackboneConfig names, for inputs of `input_shape` (without the batch dimension)."""
    if cfg.name not in BACKBONES:
        raise ConfigError(f"backbone.name: unknown backbone {cfg.name!r}; accepted: {', '.join(sorted(BACKBONES))}")
    if cfg.name == "small_cnn" and len(input_shape) != 3:
        raise ConfigError(f"backbone.name: small_cnn needs images (C, H, W), the data gives {tuple(input_shape)}")
    if cfg.pretrained or cfg.checkpoint:
        if cfg.name in ("identity",):
            raise ConfigError("backbone.pretrained / backbone.checkpoint: identity has no weights to load")
    backbone = BACKBONES[cfg.name](cfg, tuple(input_shape))
    if cfg.checkpoint:
        from pathlib import Path

        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ConfigError(f"backbone.checkpoint: file {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return backbone


@torch.no_grad()
def encode(backbone: Backbone, x: torch.Tensor, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Embeddings (N, output_dim) of raw inputs x through the frozen backbone, in batches."""
    backbone.eval().to(device)
    out = [backbone(backbone.transform(x[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, backbone.output_dim)
