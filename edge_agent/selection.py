"""Which detected windows are worth uploading: the rule, a byte budget and diversity."""

from __future__ import annotations

import math
import time

import numpy as np

from edge_agent.runtime import Detection
from shared.features import window_features


class Selector:
    """Candidates are uncertain, out-of-distribution or predicted-faulty windows.

    Out of distribution: the window held a value outside the package's input range (the
    runtime clipped it), the package's calibrated feature distance exceeds its threshold,
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
        if (
            det.out_of_range
            or det.scores.get("distance", 0.0) > 1.0
            or (self.ood_energy_above is not None and det.scores["energy"] > self.ood_energy_above)
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
            and sent.nearest(feats) < self.diversity_distance
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
        # Scratch for nearest(): the check runs on every candidate, right after an ONNX
        # Runtime call has pushed numpy's code and data out of the caches, where each array
        # operation costs 3-5 µs, several times its warm cost: no new arrays, no einsum.
        self._gap = np.empty((size, channels), dtype=dtype)
        self._spread = np.empty(channels, dtype=dtype)
        self._eps = dtype.type(1e-6)

    def add(self, means: np.ndarray) -> None:
        self.data[self.at] = means
        self.at = (self.at + 1) % len(self.data)
        self.filled = min(self.filled + 1, len(self.data))

    def nearest(self, feats: np.ndarray) -> float:
        """Smallest RMS gap between the channel means of ``feats`` and those of the windows
        held, in units of this window's channel spread. ``feats`` is (2C,): means, then
        spreads."""
        c = feats.shape[0] // 2
        n = self.filled
        gap, spread = self._gap[:n], self._spread
        np.subtract(self.data[:n], feats[:c], out=gap)  # (n, C)
        np.add(feats[c:], self._eps, out=spread)
        np.divide(gap, spread, out=gap)
        np.multiply(gap, gap, out=gap)
        return math.sqrt(float(np.add.reduce(gap, axis=1).min()) / c)
