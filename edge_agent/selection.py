"""Which detected windows are worth uploading: the rule, a byte budget and diversity."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from edge_agent.runtime import Detection


class Selector:
    """Candidates are uncertain, out-of-distribution or predicted-faulty windows.

    Out of distribution: the package's calibrated feature distance exceeds its threshold,
    or (when configured) the energy score exceeds ``ood_energy_above``.

    Two brakes stop one long event from filling the uplink: a byte budget per hour (a token
    bucket), and a diversity rule: a candidate whose channel-mean profile lies within
    ``diversity_distance`` (RMS, in units of the window's own channel spread) of one of the
    last ``memory`` sent windows with the same prediction is skipped as a near-duplicate.
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
        self.recent: deque[tuple[str, np.ndarray]] = deque(maxlen=memory)
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
        sketch = np.stack([window.mean(axis=0), window.std(axis=0) + 1e-6])  # (2, C)
        if any(
            p == det.predicted and _distance(s, sketch) < self.diversity_distance
            for p, s in self.recent
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
        self.recent.append((det.predicted, sketch))
        return reasons


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS gap between two windows' channel means, in units of their within-window spread."""
    spread = 0.5 * (a[1] + b[1])
    return float(np.sqrt(np.mean(((a[0] - b[0]) / spread) ** 2)))
