"""Labelled sensor windows from the Tennessee Eastman Process (tep-studio), cached by seed.

Features are what a plant's control system sees: the 41 measurements plus the 12
manipulated variables as implemented. Never the simulator's disturbances, disturbance
monitors or state: those name the active fault (label leakage).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import DataError

log = logging.getLogger(__name__)

NORMAL = "normal"
N_DISTURBANCES = 28
CHANNELS = 41 + 12
# Nearly undetectable from measurements in the TEP literature; allowed, but warned about.
HARD_FAULTS = frozenset({"idv_03", "idv_09", "idv_15"})
GOLDEN_SEED = 1_000_003  # disjoint from training seeds: the golden set never leaks into training
VALIDATION_SEED = 1_000_011  # of neither training nor golden: what choices are made on
CACHE_FORMAT = 1


def fault_names() -> list[str]:
    return [NORMAL] + [f"idv_{i:02d}" for i in range(1, N_DISTURBANCES + 1)]


def channel_names() -> list[str]:
    import tep_studio

    return [n for n, _, _ in tep_studio.list_measurements()] + [
        n for n, _, _ in tep_studio.list_manipulated_variables()
    ]


@dataclass(frozen=True)
class WindowSpec:
    """How a run is cut into windows. Defaults: 36 s samples, 32-sample (19 min) windows."""

    sample_interval_h: float = 0.01
    window: int = 32
    stride: int = 16
    control_interval_h: float = 0.0005  # the Ricker controller's design interval

    def check(self) -> None:
        if self.window < 2:
            raise DataError(f"window must be at least 2 samples, got {self.window}")
        if self.stride < 1:
            raise DataError(f"stride must be at least 1 sample, got {self.stride}")
        if not 0 < self.control_interval_h <= self.sample_interval_h:
            raise DataError(
                "sample_interval_h must be positive and at least control_interval_h "
                f"({self.control_interval_h} h), got {self.sample_interval_h}"
            )
        ratio = self.sample_interval_h / self.control_interval_h
        if abs(ratio - round(ratio)) > 1e-6:
            raise DataError(
                f"sample_interval_h {self.sample_interval_h} must be a whole multiple "
                f"of control_interval_h {self.control_interval_h}"
            )

    @property
    def duration_h(self) -> float:
        return self.window * self.sample_interval_h


@dataclass(frozen=True)
class RunSpec:
    """One simulated episode: the plant starts nominal, ``fault`` switches on at ``onset_h``.

    Only windows that start ``settle_h`` after the onset are labelled with the fault, so the
    first minutes of a slowly developing fault are not taught as that fault.
    """

    fault: str
    seed: int
    horizon_h: float = 6.0
    onset_h: float = 0.5
    settle_h: float = 1.0
    spec: WindowSpec = field(default_factory=WindowSpec)

    def check(self) -> None:
        self.spec.check()
        if self.fault not in fault_names():
            raise DataError(f"unknown fault {self.fault!r}; expected 'normal' or idv_01..idv_28")
        if self.onset_h < 0 or self.settle_h < 0:
            raise DataError("onset_h and settle_h must not be negative")
        first = self.onset_h + self.settle_h
        if self.horizon_h < first + self.spec.duration_h:
            raise DataError(
                f"horizon_h {self.horizon_h} is too short: the first labelled window starts at "
                f"{first} h and lasts {self.spec.duration_h:.2f} h"
            )


@dataclass
class Windows:
    """``x`` (N, T, C) float32, ``y`` (N,) int64 indices into ``class_names``."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, mask: np.ndarray) -> Windows:
        return Windows(self.x[mask], self.y[mask], list(self.class_names), dict(self.meta))

    def sha256(self) -> str:
        h = hashlib.sha256()
        for part in (self.x, self.y):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(json.dumps(self.class_names).encode())
        return h.hexdigest()


def simulate_run(run: RunSpec) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(times (N,), features (N, 53), terminated)`` sampled every ``sample_interval_h``."""
    from tep_studio import ClosedLoopSimulation

    run.check()
    spec = run.spec
    idv = np.zeros(N_DISTURBANCES)
    if run.fault != NORMAL:
        idv[int(run.fault.split("_")[1]) - 1] = 1.0
    off = np.zeros(N_DISTURBANCES)

    def schedule(t: float) -> np.ndarray:
        return idv if t >= run.onset_h else off

    every = round(spec.sample_interval_h / spec.control_interval_h)
    result = ClosedLoopSimulation(
        control_interval=spec.control_interval_h, horizon=run.horizon_h
    ).run(seed=float(run.seed), disturbance_schedule=schedule, record_every=every)
    steps = [
        r
        for i, r in enumerate(result.results)
        if i < len(result.results) - 1 or not result.terminated
    ]
    times = np.array([r.time_end for r in steps])
    feats = np.array(
        [np.concatenate([r.measurements, r.implemented_action]) for r in steps], dtype=np.float32
    )
    return times, feats, bool(result.terminated)


def cut_windows(times: np.ndarray, feats: np.ndarray, run: RunSpec) -> np.ndarray:
    """Windows (n, T, C) that start at or after onset + settle (every window of a normal run)."""
    spec = run.spec
    start_h = 0.0 if run.fault == NORMAL else run.onset_h + run.settle_h
    first = int(np.searchsorted(times, start_h - 1e-9))
    starts = range(first, len(times) - spec.window + 1, spec.stride)
    if not len(starts):
        return np.empty((0, spec.window, feats.shape[1]), dtype=np.float32)
    return np.stack([feats[s : s + spec.window] for s in starts])


def _run_windows(run: RunSpec) -> tuple[np.ndarray, bool]:
    times, feats, terminated = simulate_run(run)
    return cut_windows(times, feats, run), terminated


def generate(
    *,
    classes: Sequence[str],
    runs_per_class: int = 2,
    seed: int = 0,
    horizon_h: float = 6.0,
    onset_h: float = 0.5,
    settle_h: float = 1.0,
    spec: WindowSpec | None = None,
    cache_dir: Path | None = None,
    workers: int = 1,
) -> Windows:
    """Labelled windows for ``classes``, deterministic in ``seed`` and cached on disk.

    Each class gets ``runs_per_class`` episodes with seeds derived from ``seed``; the
    normal class is index 0 when present, otherwise classes keep the order given.
    """
    spec = spec or WindowSpec()
    classes = list(classes)
    if len(classes) < 1 or len(set(classes)) != len(classes):
        raise DataError(f"classes must be a non-empty list without repeats, got {classes}")
    if runs_per_class < 1:
        raise DataError(f"runs_per_class must be at least 1, got {runs_per_class}")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    runs = [
        RunSpec(
            fault=c,
            seed=seed * 10_000 + k * 100 + i + 1,
            horizon_h=horizon_h,
            onset_h=onset_h,
            settle_h=settle_h,
            spec=spec,
        )
        for k, c in enumerate(classes)
        for i in range(runs_per_class)
    ]
    for run in runs:
        run.check()
    hard = HARD_FAULTS.intersection(classes)
    if hard:
        log.warning("faults %s are nearly undetectable in TEP; expect low recall", sorted(hard))

    key = _cache_key(runs)
    path = cache_dir / f"tep-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        # allow_pickle=False: a cache file is data, never code.
        with np.load(path, allow_pickle=False) as z:
            return Windows(z["x"], z["y"], list(classes), json.loads(str(z["meta"])))

    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(_run_windows, runs))
    else:
        outputs = [_run_windows(r) for r in runs]
    xs, ys, shutdowns = [], [], []
    for run, (w, terminated) in zip(runs, outputs, strict=True):
        xs.append(w)
        ys.append(np.full(len(w), classes.index(run.fault), dtype=np.int64))
        if terminated:
            shutdowns.append(run.fault)
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)
    missing = [c for i, c in enumerate(classes) if not (y == i).any()]
    if missing:
        raise DataError(
            f"no windows for {missing}: the plant shut down before the first "
            "labelled window; lower settle_h or pick other faults"
        )
    meta = {
        "seed": seed,
        "runs": len(runs),
        "shutdowns": sorted(set(shutdowns)),
        "spec": asdict(spec),
        "horizon_h": horizon_h,
        "onset_h": onset_h,
        "settle_h": settle_h,
        "cache_key": key,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
    return Windows(x, y, classes, meta)


def golden_set(
    *,
    classes: Sequence[str],
    cache_dir: Path | None = None,
    runs_per_class: int = 1,
    horizon_h: float = 6.0,
    spec: WindowSpec | None = None,
    workers: int = 1,
) -> Windows:
    """The frozen evaluation set: fixed seeds, disjoint from every training seed."""
    data = generate(
        classes=classes,
        runs_per_class=runs_per_class,
        seed=GOLDEN_SEED,
        horizon_h=horizon_h,
        spec=spec,
        cache_dir=cache_dir,
        workers=workers,
    )
    data.meta["golden_sha256"] = data.sha256()
    return data


def _cache_key(runs: list[RunSpec]) -> str:
    from importlib.metadata import version

    blob = json.dumps(
        {"format": CACHE_FORMAT, "tep": version("tep-studio"), "runs": [asdict(r) for r in runs]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
