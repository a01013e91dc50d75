"""Calibration of the device's feature-distance score on normal operation (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.features import window_features


def ood_calibration(x_normal: np.ndarray, quantile: float = 0.995) -> dict[str, Any]:
    """Statistics for the device's feature-distance score, from normal-operation windows.

    The score is the mean squared z-score of a window's features against normal operation
    (a Hotelling-style T² with a diagonal covariance); the threshold is its ``quantile`` on
    the normal windows, so about 0.5% of normal windows are flagged as out of distribution.
    Faults the model was never taught still move these features, which is how they get
    uploaded at all.
    """
    feats = window_features(x_normal)
    mean = feats.mean(axis=0)
    # Floor each spread at float32 resolution: a nearly constant channel must not turn a
    # rounding difference into an alarm.
    std = np.maximum(feats.std(axis=0), 1e-5 * np.abs(mean) + 1e-6)
    score = np.mean(((feats - mean) / std) ** 2, axis=1)
    return {
        "feature_mean": mean.round(6).tolist(),
        "feature_std": std.round(6).tolist(),
        "threshold": float(np.quantile(score, quantile)),
        "quantile": quantile,
    }
