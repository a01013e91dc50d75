"""TEP windows: deterministic, cached, leak-free, and they really carry the faults."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import DataError
from sim.fleet import FleetSimulator
from sim.tep import CHANNELS, RunSpec, WindowSpec, channel_names, generate, simulate_run

from .conftest import TEP_CACHE


def test_channels_are_measurements_and_mvs_only():
    """53 channels: 41 measurements + 12 MVs; nothing from disturbances or state."""
    names = channel_names()
    assert len(names) == CHANNELS == 53
    assert not any("idv" in n.lower() or "disturb" in n.lower() for n in names)


def test_same_seed_same_windows(tmp_path):
    """Two generations with one seed give identical windows; the cache returns them too."""
    kw = dict(classes=["normal", "idv_01"], runs_per_class=1, seed=3, horizon_h=2.5)
    a = generate(**kw, cache_dir=tmp_path)
    b = generate(**kw)  # no cache: simulated again
    c = generate(**kw, cache_dir=tmp_path)  # from the cache
    assert a.sha256() == b.sha256() == c.sha256()
    assert len(list(tmp_path.glob("tep-*.npz"))) == 1
    other = generate(**{**kw, "seed": 4})
    assert other.sha256() != a.sha256()


def test_fault_shows_up_after_onset():
    """A step fault moves the plant away from where the normal run stays."""
    spec = WindowSpec()
    _, normal, _ = simulate_run(RunSpec(fault="normal", seed=1, horizon_h=3.0, spec=spec))
    _, fault, _ = simulate_run(RunSpec(fault="idv_01", seed=1, horizon_h=3.0, spec=spec))
    early = slice(0, 40)  # before the 0.5 h onset both runs are the same plant
    late = slice(-50, None)
    gap_early = np.abs(normal[early].mean(0) - fault[early].mean(0)) / (normal.std(0) + 1e-6)
    gap_late = np.abs(normal[late].mean(0) - fault[late].mean(0)) / (normal.std(0) + 1e-6)
    assert gap_late.max() > 10 * max(gap_early.max(), 0.1)


def test_windows_separate_initial_faults(tep_small):
    """A nearest-centroid classifier on window mean/std tells the initial faults apart far
    above chance on the golden set (seeds never used for training); recall per fault."""
    train, golden = tep_small

    def feats(x):
        return np.concatenate([x.mean(1), x.std(1)], 1)

    f_train, f_gold = feats(train.x), feats(golden.x)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_gold = (f_train - mu) / sd, (f_gold - mu) / sd
    centroids = np.stack([f_train[train.y == k].mean(0) for k in range(len(train.class_names))])
    pred = np.argmin(((f_gold[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    recall = {c: float((pred[golden.y == k] == k).mean()) for k, c in enumerate(golden.class_names)}
    print("per-fault recall:", recall)
    chance = 1 / len(golden.class_names)
    assert (pred == golden.y).mean() > 3 * chance
    assert min(recall.values()) > 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes=["normal", "idv_99"]), "unknown fault"),
        (dict(classes=[]), "non-empty"),
        (dict(classes=["normal", "normal"]), "repeats"),
        (dict(classes=["normal"], runs_per_class=0), "runs_per_class"),
        (dict(classes=["idv_01"], horizon_h=1.0), "too short"),
        (dict(classes=["normal"], spec=WindowSpec(window=1)), "window"),
        (dict(classes=["normal"], spec=WindowSpec(sample_interval_h=0.0007)), "multiple"),
    ],
)
def test_impossible_requests_are_refused(kwargs, match):
    """Impossible parameters raise DataError saying what is wrong, before simulating."""
    with pytest.raises(DataError, match=match):
        generate(**kwargs)


def test_fleet_brings_new_faults_per_device():
    """Each device sees the round's new fault; round 0 only knows the initial faults."""
    sim = FleetSimulator(
        devices=3,
        initial_faults=["normal", "idv_01"],
        new_faults=["idv_02", "idv_07"],
        horizon_h=2.5,
        cache_dir=TEP_CACHE,
    )
    for d in range(3):
        assert {e.fault for e in sim.schedule(d, 0)} <= {"normal", "idv_01"}
        assert "idv_02" in {e.fault for e in sim.schedule(d, 1)}
        assert "idv_07" in {e.fault for e in sim.schedule(d, 2)}
    assert sim.schedule(0, 1) != sim.schedule(1, 1)  # plants differ
    assert sim.schedule(0, 1, phase="eval") != sim.schedule(0, 1)  # fresh seeds to evaluate
    window, label = next(sim.stream(0, 1))
    assert window.shape == (32, 53) and label in {"normal", "idv_01", "idv_02"}


def test_fleet_refuses_bad_setup():
    """A fleet without devices or with a fault both initial and new is refused."""
    with pytest.raises(DataError):
        FleetSimulator(devices=0, initial_faults=["normal"], new_faults=["idv_01"])
    with pytest.raises(DataError, match="both"):
        FleetSimulator(devices=1, initial_faults=["normal", "idv_01"], new_faults=["idv_01"])
