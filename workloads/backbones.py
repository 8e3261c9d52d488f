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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TimmResNet50(Backbone):
    """ResNet-50 trained on ImageNet-1k (timm `resnet50.tv2_in1k`), layer 4 globally pooled: 2048-d."""

    resolution = 224

    def __init__(self, pretrained: bool):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model("resnet50.tv2_in1k", pretrained=pretrained, num_classes=0)
        except OSError as e:
            raise ConfigError("backbone.pretrained: could not download the resnet50_in1k weights (no network?); "
                              "set backbone.pretrained: false and backbone.checkpoint: PATH to a local file") from e
        self.output_dim = self.model.num_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, 3, H, W) -> resized to 224 x 224, ImageNet-normalised floats."""
        x = nn.functional.interpolate(super().transform(x), size=self.resolution, mode="bilinear", antialias=True,
                                      align_corners=False)
        return (x - self.mean.cpu()) / self.std.cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "identity": lambda cfg, shape: Identity(shape),
    "small_cnn": lambda cfg, shape: SmallCNN(shape),
    "resnet50_in1k": lambda cfg, shape: TimmResNet50(cfg.pretrained),
}
WITH_PRETRAINED_WEIGHTS = {"resnet50_in1k"}


def build_backbone(cfg, input_shape: tuple[int, ...]) -> Backbone:
    """The backbone a BackboneConfig names, for inputs of `input_shape` (without the batch dimension)."""
    if cfg.name not in BACKBONES:
        raise ConfigError(f"backbone.name: unknown backbone {cfg.name!r}; accepted: {', '.join(sorted(BACKBONES))}")
    if cfg.name == "small_cnn" and len(input_shape) != 3:
        raise ConfigError(f"backbone.name: small_cnn needs images (C, H, W), the data gives {tuple(input_shape)}")
    if cfg.pretrained and cfg.name not in WITH_PRETRAINED_WEIGHTS:
        raise ConfigError(f"backbone.pretrained: {cfg.name} has no pretrained weights; "
                          f"backbones that do: {', '.join(sorted(WITH_PRETRAINED_WEIGHTS))}")
    if cfg.checkpoint and cfg.name == "identity":
        raise ConfigError("backbone.checkpoint: the identity backbone has no weights to load")
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
