"""Decoders that turn the fetched values (B, C, d_v) into class logits (B, num_classes)."""
from __future__ import annotations

import torch
from torch import nn


class VoteDecoder(nn.Module):
    """The paper's parameter-free decoder: each value is a vector of class logits; average them over codebooks."""

    def forward(self, fetched: torch.Tensor) -> torch.Tensor:
        return fetched.mean(1)  # (B, C, num_classes) -> (B, num_classes)


class LinearDecoder(nn.Module):
    """A linear layer over the concatenated values."""

    def __init__(self, num_codebooks: int, value_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_codebooks * value_dim, num_classes)

    def forward(self, fetched: torch.Tensor) -> torch.Tensor:
        return self.fc(fetched.flatten(1))


class MLPDecoder(nn.Module):
    """A one-hidden-layer MLP over the concatenated values."""

    def __init__(self, num_codebooks: int, value_dim: int, num_classes: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_codebooks * value_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, fetched: torch.Tensor) -> torch.Tensor:
        return self.net(fetched.flatten(1))


def build_decoder(name: str, num_codebooks: int, value_dim: int, num_classes: int, hidden: int = 128) -> nn.Module:
    """`vote` | `linear` | `mlp`."""
    if name == "vote":
        return VoteDecoder()
    if name == "linear":
        return LinearDecoder(num_codebooks, value_dim, num_classes)
    if name == "mlp":
        return MLPDecoder(num_codebooks, value_dim, num_classes, hidden)
    raise ValueError(f"unknown decoder {name!r}; accepted: vote, linear, mlp")
