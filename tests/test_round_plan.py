"""What a round learns from, holds out and replays, as a pure function (no database)."""

from __future__ import annotations

import hashlib

from cloud.learn.data import Upload, held_out
from cloud.learn.train import plan_round


def upload(i: int, label: str, source: str = "device") -> Upload:
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return Upload(f"s{i:03d}", sha, "k", None, label, source, label_id=i)


def test_the_plan_splits_by_content_hash_and_keeps_teacher_labels_out_of_the_holdout():
    """Held out: exactly the device/operator windows whose hash falls in the fraction;
    a teacher's pseudo-label is always learnt from, never used as evidence."""
    new = [upload(i, "idv_06") for i in range(40)] + [
        upload(i, "idv_06", source="teacher") for i in range(40, 80)
    ]

    plan = plan_round(new, [], ["normal", "idv_01"], 0.25)

    expected = {u.sample_id for u in new[:40] if held_out(u.sha256, 0.25)}
    assert {u.sample_id for u in plan.hold} == expected and 0 < len(expected) < 40
    assert not {u.sample_id for u in plan.fit} & expected
    assert len(plan.fit) + len(plan.hold) == len(new)
    assert all(u.source != "teacher" for u in plan.hold)
    assert plan.new_classes == ["idv_06"]


def test_a_relabelled_window_is_not_replayed_under_its_old_label():
    """A reservoir window that came back with a new label is learnt (or held out) with the
    new one; the rest of the reservoir is replayed as it is, in its order."""
    reservoir = [("base:0", "normal"), ("sample:s001", "idv_01"), ("base:1", "idv_01")]
    new = [upload(1, "idv_02")]

    plan = plan_round(new, reservoir, ["normal", "idv_01"], 0.0)

    assert plan.replay == [("base:0", "normal"), ("base:1", "idv_01")]
    assert [u.label for u in plan.fit] == ["idv_02"] and plan.new_classes == ["idv_02"]
