"""The learning bench's plant and cloud: TEP episodes simulated in parallel and cached, the
embedded services `edgeloop demo` uses (SQLite, a local object directory, MLflow's sqlite
store), and labelled uploads stored as ingest stores them, each dated by its device's clock."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from sim.tep import NORMAL, WindowSpec, generate

SPEC = WindowSpec()  # 36 s samples, 32-sample windows, stride 16: a window every 576 s
HORIZON_H = 6.0
ONSET_H, SETTLE_H = 0.5, 1.0  # sim.tep's defaults: the first fault window starts at 1.5 h


@dataclass(frozen=True)
class Episodes:
    """``runs`` episodes of ``fault``; ``seed`` is generate's (episode seeds derive from it,
    so two Episodes with different seeds share no episode)."""

    fault: str
    runs: int
    seed: int

    def kwargs(self, cache: Path) -> dict:
        return dict(
            classes=[self.fault], runs_per_class=self.runs, seed=self.seed,
            horizon_h=HORIZON_H, onset_h=ONSET_H, settle_h=SETTLE_H, spec=SPEC, cache_dir=cache,
        )  # fmt: skip


def _simulate(args: tuple[Episodes, Path]) -> int:
    episodes, cache = args
    return len(generate(**episodes.kwargs(cache)))


def simulate(jobs: Sequence[Episodes], cache: Path, workers: int) -> None:
    """Every job simulated into the cache, ``workers`` at a time (cached ones are read)."""
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_simulate, [(j, cache) for j in jobs]))
    else:
        for j in jobs:
            _simulate((j, cache))


def windows(episodes: Episodes, cache: Path) -> np.ndarray:
    """The labelled windows (N, T, C) of ``episodes``, in episode order."""
    return generate(**episodes.kwargs(cache)).x


def labelled(parts: Sequence[Episodes], cache: Path):
    """One LabelledWindows of several Episodes (labels by fault name)."""
    from cloud.store.datasets import LabelledWindows

    xs = [windows(p, cache) for p in parts]
    labels = [np.full(len(x), p.fault) for x, p in zip(xs, parts, strict=True)]
    return LabelledWindows(np.concatenate(xs), np.concatenate(labels))


# -- the cloud ------------------------------------------------------------------------------------


@dataclass
class Cloud:
    sessions: object
    store: object
    settings: object
    registries: dict = field(default_factory=dict)

    def registry(self, fleet: str):
        from cloud.tracking.registry import open_registry

        if fleet not in self.registries:
            self.registries[fleet] = open_registry(self.settings, fleet)
        return self.registries[fleet]


def embedded_cloud(home: Path) -> Cloud:
    """A fresh embedded cloud under ``home`` (what was there is removed)."""
    from cloud.config import CloudSettings
    from cloud.store.db import migrate, session_factory
    from cloud.store.objects import LocalObjectStore

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    settings = CloudSettings(mode="embedded", home=home.resolve(), store="local")
    migrate(settings.resolved_database_url)
    return Cloud(
        session_factory(settings.resolved_database_url, settings),
        LocalObjectStore(home / "objects"),
        settings,
    )


# -- uploads --------------------------------------------------------------------------------------


class PlantClock:
    """Each device's plant time: episodes run back to back; a window is dated by its last
    sample (the first labelled window of a fault episode ends 1.5 h + 32 samples after the
    episode starts, each next one a stride, 576 s, later)."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.now: dict[str, datetime] = {}

    def episode(self, device: str, n: int, fault: str) -> list[datetime]:
        t0 = self.now.get(device, self.start)
        step = timedelta(hours=SPEC.sample_interval_h)
        first = 0 if fault == NORMAL else round((ONSET_H + SETTLE_H) / SPEC.sample_interval_h)
        self.now[device] = t0 + timedelta(hours=HORIZON_H)
        return [t0 + step * (first + j * SPEC.stride + SPEC.window - 1) for j in range(n)]


def add_uploads(
    *,
    cloud: Cloud,
    fleet: str,
    device: str,
    x: np.ndarray,
    label: str,
    captured_at: list[datetime],
    id_prefix: str,
) -> list[str]:
    """Windows stored and recorded as ingest stores them (object under the content hash,
    one sample row each), labelled by the device. Returns their sample ids."""
    from cloud.store.db import Label, Sample
    from cloud.store.windows import content_sha256, npy_bytes

    ids = []
    with cloud.sessions() as s:
        for i, (w, at) in enumerate(zip(x, captured_at, strict=True)):
            sha = content_sha256(w)
            cloud.store.put(f"windows/{sha}.npy", npy_bytes(w))
            sid = f"{id_prefix}-{i:012d}"
            s.add(
                Sample(
                    id=sid, device_id=device, fleet=fleet, content_sha256=sha,
                    object_key=f"windows/{sha}.npy", dtype="float32", shape=list(w.shape),
                    captured_at=at, model_version="bench", predicted=NORMAL, confidence=0.5,
                    score=0.0,
                )
            )  # fmt: skip
            s.flush()
            s.add(Label(sample_id=sid, label=label, source="device"))
            ids.append(sid)
        s.commit()
    return ids


def plant_start(seed: int) -> datetime:
    """Where seed ``seed``'s device clocks start: fixed, so a rerun splits its uploads the
    same way (the hold-out's blocks are drawn from the device and the block's absolute
    number), and a week and 1,237 s on per seed, so each seed draws its own layout. The
    rows are written as ingest stores them, not through its 30-day age check."""
    return datetime(2026, 1, 5, tzinfo=UTC) + seed * timedelta(days=7, seconds=1237)
