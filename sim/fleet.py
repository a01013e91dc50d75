"""A simulated fleet: each device is a TEP plant with its own fault schedule, and fault
types unseen in training start to appear round by round."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from shared.errors import DataError
from sim.tep import NORMAL, RunSpec, WindowSpec, cut_windows, fault_names, simulate_run


@dataclass(frozen=True)
class Episode:
    """One stretch of plant operation: nominal start, ``fault`` from ``onset_h`` on."""

    fault: str
    seed: int
    horizon_h: float


@dataclass
class FleetSimulator:
    devices: int
    initial_faults: Sequence[str]
    new_faults: Sequence[str]  # new_faults[r - 1] first appears in round r
    episodes_per_round: int = 3
    horizon_h: float = 5.0
    seed: int = 0
    spec: WindowSpec = field(default_factory=WindowSpec)
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise DataError(f"a fleet needs at least one device, got {self.devices}")
        if self.episodes_per_round < 2:
            raise DataError("episodes_per_round must be at least 2 (the new fault and another)")
        known = set(fault_names())
        for f in [*self.initial_faults, *self.new_faults]:
            if f not in known:
                raise DataError(f"unknown fault {f!r}; expected 'normal' or idv_01..idv_28")
        if NORMAL not in self.initial_faults:
            raise DataError("initial_faults must include 'normal'")
        overlap = set(self.initial_faults) & set(self.new_faults)
        if overlap:
            raise DataError(f"faults {sorted(overlap)} cannot be both initial and new")

    @property
    def device_ids(self) -> list[str]:
        return [f"plant-{i + 1:02d}" for i in range(self.devices)]

    def faults_in_round(self, rnd: int) -> list[str]:
        return [*self.initial_faults, *self.new_faults[:rnd]]

    def schedule(self, device: int, rnd: int, *, phase: str = "stream") -> list[Episode]:
        """Device ``device``'s episodes in round ``rnd``; from round 1 on, the round's new
        fault is always among them. ``phase`` 'eval' gives fresh seeds for the same mix."""
        rng = np.random.default_rng([self.seed, device, rnd, phase == "eval"])
        pool = self.faults_in_round(rnd)
        faults: list[str] = []
        if rnd >= 1:
            faults.append(self.new_faults[rnd - 1])
        others = [f for f in pool if f not in faults]
        faults += list(
            rng.choice(
                others,
                size=self.episodes_per_round - len(faults),
                replace=len(others) < self.episodes_per_round - len(faults),
            )
        )
        base = 1_000 * (self.seed + 1) + 100 * device + 10 * rnd + (5 if phase == "eval" else 0)
        return [Episode(str(f), base + i, self.horizon_h) for i, f in enumerate(faults)]

    def windows(self, episode: Episode) -> np.ndarray:
        """The episode's labelled windows (n, T, C), from the on-disk cache when there."""
        run = RunSpec(
            fault=episode.fault, seed=episode.seed, horizon_h=episode.horizon_h, spec=self.spec
        )
        path = None
        if self.cache_dir is not None:
            path = (
                self.cache_dir / f"episode-{episode.fault}-{episode.seed}-{episode.horizon_h}.npy"
            )
            if path.exists():
                return np.load(path, allow_pickle=False)  # data only, never code
        times, feats, _ = simulate_run(run)
        w = cut_windows(times, feats, run)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, w, allow_pickle=False)
        return w

    def stream(
        self, device: int, rnd: int, *, phase: str = "stream"
    ) -> Iterator[tuple[np.ndarray, str]]:
        """``(window (T, C), true label)`` in time order for one device and round."""
        for ep in self.schedule(device, rnd, phase=phase):
            for w in self.windows(ep):
                yield w, ep.fault

    @property
    def round_hours(self) -> float:
        """Plant time one round's episodes take, back to back."""
        return self.episodes_per_round * self.horizon_h

    def timed_stream(
        self, device: int, rnd: int, *, start: datetime, phase: str = "stream"
    ) -> Iterator[tuple[np.ndarray, str, datetime]]:
        """As ``stream``, with each window's plant time (of its last sample) when the round's
        episodes run back to back from ``start``: what a device stamps as captured_at."""
        for e, ep in enumerate(self.schedule(device, rnd, phase=phase)):
            ends = self.window_ends_h(ep)
            # A run the plant shut down early has fewer windows than its horizon's ends.
            for w, end_h in zip(self.windows(ep), ends, strict=False):
                yield w, ep.fault, start + timedelta(hours=e * self.horizon_h + end_h)

    def window_ends_h(self, episode: Episode) -> np.ndarray:
        """Hours from the episode's start to the end of each window's last sample, as
        sim.tep.cut_windows cuts them."""
        run = RunSpec(fault=episode.fault, seed=episode.seed, horizon_h=episode.horizon_h,
                      spec=self.spec)  # fmt: skip
        dt = self.spec.sample_interval_h
        # As sim.tep.simulate_run stamps its samples.
        times = self.spec.control_interval_h + np.arange(int(round(episode.horizon_h / dt))) * dt
        start_h = 0.0 if run.fault == NORMAL else run.onset_h + run.settle_h
        first = int(np.searchsorted(times, start_h - 1e-9))
        return times[first + self.spec.window - 1 :: self.spec.stride]
