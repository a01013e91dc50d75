"""What a round learns from, validates on, holds out and replays, as a pure function (no
database), on real TEP windows with the times a plant would give them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from cloud.learn.data import Upload
from cloud.learn.split import SplitConfig
from cloud.learn.train import plan_round
from sim.fleet import Episode, FleetSimulator
from sim.tep import WindowSpec

SPEC = WindowSpec()  # 36 s samples, 32-sample windows every 16 samples
WINDOW_S = SPEC.window * SPEC.sample_interval_h * 3600
T0 = datetime(2026, 1, 5, tzinfo=UTC)
SPLIT = SplitConfig(
    holdout_fraction=0.25, validation_fraction=0.15, block_s=3600, window_s=WINDOW_S
)


def upload(i, label, *, device="d1", at=T0, source="device", sha=None) -> Upload:
    sha = sha or hashlib.sha256(str(i).encode()).hexdigest()
    return Upload(f"s{i:05d}", sha, "k", None, label, source, i, device, at)


@pytest.fixture(scope="module")
def plant_day():
    """Two devices, each a day of normal operation and a fault, in 5 h episodes back to
    back: every window with the plant time of its last sample. Returns (windows, uploads)."""
    from tests.conftest import TEP_CACHE

    sim = FleetSimulator(devices=1, initial_faults=["normal"], new_faults=[], cache_dir=TEP_CACHE)
    windows, uploads = [], []
    for d, device in enumerate(["d1", "d2"]):
        start = T0 + timedelta(days=d)  # another day, so their blocks differ as well
        for e, fault in enumerate(["normal", "normal", "idv_01", "normal", "idv_01"]):
            ep_start = start + timedelta(hours=5 * e)
            ep = Episode(fault, 700 + 10 * d + e, 5.0)
            # The sim's plant times (sim.fleet): checked here too, by the rows they share.
            for w, end_h in zip(sim.windows(ep), sim.window_ends_h(ep), strict=True):
                uploads.append(
                    upload(len(uploads), fault, device=device, at=ep_start + timedelta(hours=end_h))
                )
                windows.append(w)
    return np.stack(windows), uploads


def rows(windows: np.ndarray, ids: list[int]) -> set[bytes]:
    return {r.tobytes() for i in ids for r in windows[i]}


def shared_rows(windows, a: list[Upload], b: list[Upload]) -> int:
    ids = lambda us: [int(u.sample_id[1:]) for u in us]  # noqa: E731
    return len(rows(windows, ids(a)) & rows(windows, ids(b)))


def test_the_sides_share_no_sample(plant_day):
    """Hold-out, validation and training windows share no row of sensor data, on windows
    that overlap half their width; a split by content hash of the same windows does."""
    windows, uploads = plant_day

    plan = plan_round(uploads, [], ["normal"], SPLIT)

    assert plan.fit and plan.val and plan.hold
    assert shared_rows(windows, plan.hold, plan.fit) == 0
    assert shared_rows(windows, plan.hold, plan.val) == 0
    assert shared_rows(windows, plan.val, plan.fit) == 0
    assert len(plan.fit) + len(plan.val) + len(plan.hold) + len(plan.gap) == len(uploads)
    # The gaps cost about one window either side of a held or validation block, no more.
    assert len(plan.gap) < 0.3 * len(uploads)
    # What the round did before: hold out by content hash. Its sides share samples.
    digest = {u.sample_id: hashlib.sha256(windows[int(u.sample_id[1:])]).digest() for u in uploads}
    by_hash = [u for u in uploads if digest[u.sample_id][0] < 64]  # a quarter
    rest = [u for u in uploads if digest[u.sample_id][0] >= 64]
    assert shared_rows(windows, by_hash, rest) > 0


def test_a_window_stays_on_its_side_in_every_round(plant_day):
    """Rounds see the uploads that arrived so far: a window's side does not depend on what
    else arrived (its device and time decide), so a parent never learnt what its successor
    is judged on."""
    _, uploads = plant_day
    whole = plan_round(uploads, [], ["normal"], SPLIT)
    first_half = plan_round(uploads[::2], [], ["normal"], SPLIT)

    side = {u.sample_id: s for s in ("fit", "val", "hold", "gap") for u in getattr(whole, s)}
    for s in ("fit", "val", "hold", "gap"):
        assert all(side[u.sample_id] == s for u in getattr(first_half, s))


def test_teacher_labels_are_never_evidence(plant_day):
    """A pseudo-label is learnt from on the training side and left out on the others: it is
    no evidence, and learning it would put its samples on both sides."""
    _, uploads = plant_day
    pseudo = [upload(i + 100_000, u.label, device=u.device_id, at=u.captured_at,
                     source="teacher") for i, u in enumerate(uploads)]  # fmt: skip

    plan = plan_round(pseudo, [], ["normal"], SPLIT)

    assert plan.fit and not plan.val and not plan.hold
    assert all(u.source == "teacher" for u in plan.fit)
    by_side = plan_round(uploads, [], ["normal"], SPLIT)
    assert len(plan.gap) == len(by_side.gap) + len(by_side.val) + len(by_side.hold)


def test_a_relabelled_window_is_not_replayed_under_its_old_label():
    """A reservoir window that came back with a new label is learnt (or held out) with the
    new one; the rest of the reservoir is replayed as it is, in its order."""
    reservoir = [("base:0", "normal"), ("sample:s00001", "idv_01"), ("base:1", "idv_01")]
    new = [upload(1, "idv_02")]

    plan = plan_round(new, reservoir, ["normal", "idv_01"], SplitConfig(0.0, 0.0))

    assert plan.replay == [("base:0", "normal"), ("base:1", "idv_01")]
    assert [u.label for u in plan.fit] == ["idv_02"] and plan.new_classes == ["idv_02"]


def test_a_split_that_leaves_nothing_to_learn_is_refused():
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to train on"):
        SplitConfig(holdout_fraction=0.6, validation_fraction=0.4).check()
    with pytest.raises(ConfigError, match="at least one window"):
        SplitConfig(block_s=600, window_s=1152).check()
