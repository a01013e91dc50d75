"""Input standardisation kept inside a model: the training data's channel mean and spread,
as buffers, so the exported graph takes raw sensor values and a device needs no code.

The standardised value is clipped to ±``CLIP_SIGMA`` spreads: a finite but extreme reading
(a stuck transmitter at 1e38, a unit mix-up) would otherwise overflow the layers after it
and make the logits non-finite, which a device counts as the model failing. The clip is in
``forward``, so training, evaluation and the exported graph all apply it; the package's
manifest records the raw range it keeps (``input_range``) so a device can also clip
before the graph and flag the window as out of distribution (edge_agent.runtime).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shared.package import CLIP_SIGMA


def fit_input_stats(model: nn.Module, x_normal: np.ndarray, channels: int) -> None:
    """Set ``model.mean`` / ``model.std`` (C,) from normal-operation windows (N, T, C)."""
    flat = torch.as_tensor(x_normal.reshape(-1, channels), dtype=torch.float32)
    model.get_buffer("mean").copy_(flat.mean(0))
    model.get_buffer("std").copy_(flat.std(0).clamp_min(1e-3))


def standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw windows (B, T, C) → standardised with a model's ``mean`` / ``std`` buffers and
    clipped to ±CLIP_SIGMA (what every model's ``forward`` starts with). An overflow to
    ±inf in the subtraction is clipped too; NaN stays NaN (the device refuses it first)."""
    return ((x - mean) / std).clamp(-CLIP_SIGMA, CLIP_SIGMA)


def input_range(model: nn.Module) -> dict[str, Any]:
    """The raw values (per channel) that standardise within ±CLIP_SIGMA, for the package's
    manifest (``metadata.input_range``; shared.package.input_range reads it). In float32,
    as the device compares them."""
    mean = model.get_buffer("mean").detach().cpu().numpy().astype(np.float32)
    std = model.get_buffer("std").detach().cpu().numpy().astype(np.float32)
    sigma = np.float32(CLIP_SIGMA)
    return {
        "low": (mean - sigma * std).tolist(),
        "high": (mean + sigma * std).tolist(),
        "clip_sigma": CLIP_SIGMA,
    }
