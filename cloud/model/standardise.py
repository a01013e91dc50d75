"""Input standardisation kept inside a model: the training data's channel mean and spread,
as buffers, so the exported graph takes raw sensor values and a device needs no code."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def fit_input_stats(model: nn.Module, x_normal: np.ndarray, channels: int) -> None:
    """Set ``model.mean`` / ``model.std`` (C,) from normal-operation windows (N, T, C)."""
    flat = torch.as_tensor(x_normal.reshape(-1, channels), dtype=torch.float32)
    model.get_buffer("mean").copy_(flat.mean(0))
    model.get_buffer("std").copy_(flat.std(0).clamp_min(1e-3))
