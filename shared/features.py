"""Window features both sides compute: each channel's level and spread over a window.

The device's diversity rule and its feature-distance score use them; the cloud calibrates
that score on them (normal operation). One function, so both sides agree to the bit.
"""

from __future__ import annotations

import numpy as np


def window_features(windows: np.ndarray) -> np.ndarray:
    """(B, T, C) → (B, 2C): each channel's mean and standard deviation over the window, in
    float64 and in two passes (mean, then the spread around it): a one-pass sum of squares
    loses digits on a channel with a large level and a small spread."""
    x = np.asarray(windows, dtype=np.float64)
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)
