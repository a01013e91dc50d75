"""Anomaly scores of a window, pluggable: each is one callable, logits and windows in.

Every score is "higher means more anomalous". A package may carry calibration for a
score in its manifest metadata (``ood``: feature statistics of normal operation, made by
the cloud when it packages a model); scores without their calibration are not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class Scorer(Protocol):
    def __call__(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        """(B, K) logits and (B, 2C) window features (shared.features) → (B,) scores."""
        ...


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def energy(logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) (Liu et al. 2020): high when no class explains the window."""
    return -_logsumexp(logits.astype(np.float64))


def max_softmax(logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    """1 - max softmax probability (Hendrycks & Gimpel 2017): high when the model hesitates."""
    z = logits.astype(np.float64)
    return 1.0 - np.exp(z.max(axis=1) - _logsumexp(z))


class FeatureDistance:
    """Mean squared z-score of the window's per-channel level and spread against normal
    operation, divided by the calibrated threshold: over 1 is out of distribution.

    It looks at the sensors, not at the model, so it still fires for a fault the model
    was never taught and confidently calls normal.
    """

    def __init__(self, calibration: Mapping[str, Any]) -> None:
        self.mean = np.asarray(calibration["feature_mean"], dtype=np.float64)
        self.std = np.asarray(calibration["feature_std"], dtype=np.float64)
        self.threshold = float(calibration["threshold"])

    def __call__(self, logits: np.ndarray, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.std
        return np.einsum("bf,bf->b", z, z) / (z.shape[1] * self.threshold)


def scorers_for(metadata: Mapping[str, Any]) -> dict[str, Scorer]:
    """The scores a package supports: energy and max-softmax always, distance if calibrated."""
    out: dict[str, Scorer] = {"energy": energy, "max_softmax": max_softmax}
    if metadata.get("ood"):
        out["distance"] = FeatureDistance(metadata["ood"])
    return out
