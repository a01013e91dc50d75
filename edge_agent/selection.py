"""Which detected windows are worth uploading: the rule, a byte budget and diversity."""

from __future__ import annotations

import math
import time

import numpy as np

from edge_agent.runtime import Detection
from shared.features import window_features


class Selector:
    """Candidates are uncertain, out-of-distribution or predicted-faulty windows.

    Out of distribution: the package's calibrated feature distance exceeds its threshold,
    or (when configured) the energy score exceeds ``ood_energy_above``.

    Two brakes stop one long event from filling the uplink: a byte budget per hour (a token
    bucket), and a diversity rule: a candidate whose channel-mean profile lies within
    ``diversity_distance`` (RMS, in units of the candidate's own channel spread) of one of the
    last ``memory`` sent windows with the same prediction is skipped as a near-duplicate
    (0 turns the rule off).
    """

    def __init__(
        self,
        *,
        uncertain_below: float,
        ood_energy_above: float | None,
        normal_class: str,
        bytes_per_hour: int,
        diversity_distance: float,
        memory: int = 64,
    ) -> None:
        self.uncertain_below = uncertain_below
        self.ood_energy_above = ood_energy_above
        self.normal_class = normal_class
        self.rate = bytes_per_hour / 3600.0
        self.capacity = float(bytes_per_hour)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self.diversity_distance = diversity_distance
        self.memory = memory
        # Per predicted class, the channel means of the last `memory` windows sent, as a
        # ring: (memory, C) rows, of which the first `filled` hold windows, `at` the next
        # to overwrite. A ring, not a growing concatenation: one row write per upload.
        self.recent: dict[str, _Ring] = {}
        self.skipped_budget = 0
        self.skipped_duplicate = 0

    def reasons(self, det: Detection) -> tuple[str, ...]:
        out = []
        if det.confidence < self.uncertain_below:
            out.append("uncertain")
        if det.predicted != self.normal_class:
            out.append("faulty")
        if det.scores.get("distance", 0.0) > 1.0 or (
            self.ood_energy_above is not None and det.scores["energy"] > self.ood_energy_above
        ):
            out.append("ood")
        return tuple(out)

    def admit(self, window: np.ndarray, det: Detection, nbytes: int) -> tuple[str, ...]:
        """The reasons to upload ``window``, or () when it should stay on the device."""
        reasons = self.reasons(det)
        if not reasons:
            return ()
        feats = det.features if det.features is not None else window_features(window[None])[0]
        sent = self.recent.get(det.predicted)
        if (
            sent is not None
            and self.diversity_distance > 0
            and _nearest(sent.rows(), feats) < self.diversity_distance
        ):
            self.skipped_duplicate += 1
            return ()
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if nbytes > self.tokens:
            self.skipped_budget += 1
            return ()
        self.tokens -= nbytes
        if sent is None:
            sent = self.recent[det.predicted] = _Ring(self.memory, feats.shape[0] // 2, feats.dtype)
        sent.add(feats[: feats.shape[0] // 2])  # only the means are compared later
        return reasons

    def forget(self) -> None:
        """Forget the windows sent and refill the byte budget, as on a fresh start."""
        self.recent.clear()
        self.tokens = self.capacity
        self.last = time.monotonic()


class _Ring:
    """The channel means of the last ``size`` windows sent for one class."""

    def __init__(self, size: int, channels: int, dtype: np.dtype) -> None:
        self.data = np.empty((size, channels), dtype=dtype)
        self.filled = 0
        self.at = 0

    def add(self, means: np.ndarray) -> None:
        self.data[self.at] = means
        self.at = (self.at + 1) % len(self.data)
        self.filled = min(self.filled + 1, len(self.data))

    def rows(self) -> np.ndarray:
        return self.data if self.filled == len(self.data) else self.data[: self.filled]


def _nearest(sent: np.ndarray, feats: np.ndarray) -> float:
    """Smallest RMS gap between the channel means of ``feats`` and those of the windows
    sent (rows of ``sent``: their means only), in units of this window's channel spread.
    ``feats`` is (2C,): means, then spreads. Five array operations: it runs on every
    candidate."""
    c = feats.shape[0] // 2
    gap = sent - feats[:c]  # (n, C)
    gap /= feats[c:] + 1e-6
    return math.sqrt(float(np.einsum("nc,nc->n", gap, gap).min()) / c)
