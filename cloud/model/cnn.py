"""The CNN window classifier: a small, fast model that cannot be pruned by blocks (a fleet
on the cpu-fp32 profile runs it as it is)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cloud.model.standardise import fit_input_stats, standardise


@dataclass(frozen=True)
class ModelConfig:
    window: int = 32  # T
    channels: int = 53  # C
    n_classes: int = 2
    hidden: int = 48
    kernel: int = 5
    layers: int = 3
    dropout: float = 0.1


class WindowClassifier(nn.Module):
    """Windows (B, T, C) → logits (B, K): standardise, temporal convs, mean+std pooling.

    The channel mean/std of the training data are buffers, so the exported graph takes raw
    sensor values and a device needs no preprocessing code.
    """

    exporter = "torchscript"  # see cloud.model.export
    mean: torch.Tensor  # (C,) buffers: the training data's channel statistics
    std: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.channels))
        self.register_buffer("std", torch.ones(cfg.channels))
        blocks: list[nn.Module] = []
        width = cfg.channels
        for _ in range(cfg.layers):
            blocks += [
                nn.Conv1d(width, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2),
                nn.BatchNorm1d(cfg.hidden),
                nn.GELU(),
            ]
            width = cfg.hidden
        self.body = nn.Sequential(*blocks)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.hidden + cfg.channels, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = standardise(x, self.mean, self.std)  # (B, T, C), clipped to ±CLIP_SIGMA
        level = z.mean(dim=1)  # (B, C): where each channel sits relative to normal operation
        h = self.body(z.transpose(1, 2))  # (B, H, T)
        pooled = torch.cat([h.mean(dim=2), h.std(dim=2), level], dim=1)  # (B, 2H + C)
        return self.head(self.drop(pooled))  # (B, K)


def build_model(cfg: ModelConfig, x_normal: np.ndarray | None = None) -> WindowClassifier:
    """A fresh CNN; with normal-operation windows, its input standardisation is set."""
    model = WindowClassifier(cfg)
    if x_normal is not None:
        fit_input_stats(model, x_normal, cfg.channels)
    return model
