"""The gate function alone: labels and predictions in, a report out, no database."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.learn.gates import GateLimits, Predictions, judge

OLD = ["normal", "idv_01", "idv_02"]
NEW = [*OLD, "idv_06"]
# A golden set of 10 windows per class, the new fault included.
GOLDEN = np.repeat(np.array(NEW), 10)


def perfect(names: list[str]) -> np.ndarray:
    """Every golden window of a class ``names`` knows called right; the rest normal."""
    return np.array([names.index(c) if c in names else 0 for c in GOLDEN])


def test_a_candidate_that_learns_the_new_fault_and_keeps_the_old_ones_passes():
    """Right on every class, the parent right on its own: passed, nothing failed, and the
    report says by how much detection rose."""
    report = judge(
        golden_labels=GOLDEN,
        candidate=Predictions(perfect(NEW), NEW),
        limits=GateLimits(),
        parent=Predictions(perfect(OLD), OLD),
        holdout_labels=["idv_06"] * 4,
        holdout_pred=np.full(4, NEW.index("idv_06")),
        new_classes=["idv_06"],
    )

    assert report.passed and report.failed == []
    assert report.golden_macro_f1 == pytest.approx(1.0)
    # The parent called idv_06 normal (20 of 30 fault windows flagged); the candidate all.
    assert report.detection_rate_before == 20 / 30 and report.detection_rate == 1.0
    assert report.detection_drop_pts < 0 and report.old_f1_drop_pts == 0.0
    assert report.holdout_new_recall == {"idv_06": 1.0}
    d = report.as_dict()
    assert d["passed"] is True and d["max_old_f1_drop_pts"] == 1.0 and d["min_new_recall"] == 0.9


def test_forgetting_an_old_fault_fails_two_gates_with_the_figures():
    """A candidate that calls idv_01 normal loses detection and old-class F1: both gates
    fail and each says how far it fell against which limit."""
    pred = perfect(NEW)
    pred[GOLDEN == "idv_01"] = 0
    report = judge(
        golden_labels=GOLDEN,
        candidate=Predictions(pred, NEW),
        limits=GateLimits(max_old_f1_drop_pts=3.0, max_detection_drop_pts=3.0),
        parent=Predictions(perfect(NEW), NEW),
    )

    assert not report.passed
    assert report.detection_drop_pts == 100 * (1.0 - 20 / 30)
    assert report.failed[0] == "detection rate fell 33.3 pts (> 3.0)"
    assert report.failed[1].startswith("old classes' macro-F1 fell ")
    assert report.old_f1_drop_pts > 3.0


def test_a_small_drop_within_the_limits_passes():
    """One golden window of idv_02 called idv_01: the drops are real but inside limits."""
    pred = perfect(OLD)
    pred[np.flatnonzero(GOLDEN == "idv_02")[0]] = OLD.index("idv_01")
    report = judge(
        golden_labels=GOLDEN,
        candidate=Predictions(pred, OLD),
        limits=GateLimits(max_old_f1_drop_pts=5.0),
        parent=Predictions(perfect(OLD), OLD),
    )

    assert report.passed
    assert 0 < report.old_f1_drop_pts <= 5.0 and report.detection_drop_pts == 0.0


def test_a_new_class_missed_on_the_held_out_uploads_fails():
    """The new fault recalled on 1 of 4 held-out uploads: below the bar, named."""
    report = judge(
        golden_labels=GOLDEN,
        candidate=Predictions(perfect(NEW), NEW),
        limits=GateLimits(min_new_recall=0.5),
        holdout_labels=["idv_06"] * 4,
        holdout_pred=np.array([3, 0, 0, 0]),
        new_classes=["idv_06"],
    )

    assert report.failed == ["held-out recall of idv_06 is 0.25 (< 0.5)"]
    assert report.holdout_new_recall == {"idv_06": 0.25}


def test_the_first_model_is_judged_without_a_parent():
    """No parent: no comparison in the report, only what the model does itself."""
    report = judge(
        golden_labels=GOLDEN, candidate=Predictions(perfect(OLD), OLD), limits=GateLimits()
    )

    d = report.as_dict()
    assert report.passed
    assert set(d) == {"golden_macro_f1", "detection_rate", "passed", "failed"}
    # Golden windows of a class the model does not know count for detection, not F1.
    assert d["golden_macro_f1"] == pytest.approx(1.0) and d["detection_rate"] == 20 / 30


def test_gate_defaults_are_the_goals_and_a_fleet_may_set_its_own(monkeypatch):
    """Every round's gates default to the product's goals (new-class recall ≥ 0.9, old
    classes' macro-F1 drop ≤ 1 pt); EDGELOOP_ROUND_GATES_BY_FLEET sets them per fleet, and
    a gate it does not know is refused, named."""
    import pydantic

    from cloud.config import CloudSettings
    from cloud.learn.state import RoundConfig

    monkeypatch.setenv("EDGELOOP_ROUND_GATES_BY_FLEET", '{"press-line": {"min_new_recall": 0.8}}')
    settings = CloudSettings()
    press = RoundConfig.from_settings(settings, fleet="press-line", profile="cpu-fp32")
    other = RoundConfig.from_settings(settings, fleet="mill", profile="cpu-fp32")

    assert (GateLimits().min_new_recall, GateLimits().max_old_f1_drop_pts) == (0.9, 1.0)
    assert (other.min_new_recall, other.max_old_f1_drop_pts) == (0.9, 1.0)
    assert RoundConfig(fleet="x").min_new_recall == 0.9
    assert (press.min_new_recall, press.max_old_f1_drop_pts) == (0.8, 1.0)
    monkeypatch.setenv("EDGELOOP_ROUND_GATES_BY_FLEET", '{"mill": {"min_recall": 0.8}}')
    with pytest.raises(pydantic.ValidationError, match="min_recall"):
        CloudSettings()
