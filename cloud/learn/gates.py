"""The gates a round's package must pass, as one pure function of labels and predictions:
``judge`` is what the evaluate stage calls, and what a test calls without a database."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud.model.metrics import classification_metrics
from cloud.store.datasets import label_indices


@dataclass(frozen=True)
class GateLimits:
    """Defaults: the product's goals, as cloud.config's round_* settings have them."""

    max_old_f1_drop_pts: float = 1.0
    max_detection_drop_pts: float = 3.0
    min_new_recall: float = 0.9


@dataclass(frozen=True)
class Predictions:
    """What one package predicted (indices into ``class_names``)."""

    pred: np.ndarray
    class_names: list[str]


@dataclass
class GateReport:
    golden_macro_f1: float
    detection_rate: float  # share of the golden fault windows flagged as not normal
    # Against the parent (None for the first model):
    detection_rate_before: float | None = None
    old_f1_before: float | None = None  # the parent's macro-F1 on the classes it knew
    old_f1_after: float | None = None  # the candidate's on the same windows
    limits: GateLimits = field(default_factory=GateLimits)
    # On the held-out slice of the new uploads (None: no slice):
    holdout_new_recall: dict[str, float] | None = None
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def detection_drop_pts(self) -> float | None:
        if self.detection_rate_before is None:
            return None
        return 100 * (self.detection_rate_before - self.detection_rate)

    @property
    def old_f1_drop_pts(self) -> float | None:
        if self.old_f1_before is None or self.old_f1_after is None:
            return None
        return 100 * (self.old_f1_before - self.old_f1_after)

    def as_dict(self) -> dict[str, Any]:
        """The report as rounds, MLflow tags and the CLI keep it."""
        out: dict[str, Any] = {
            "golden_macro_f1": self.golden_macro_f1,
            "detection_rate": self.detection_rate,
        }
        if self.detection_rate_before is not None:
            out.update(
                detection_rate_before=self.detection_rate_before,
                detection_drop_pts=self.detection_drop_pts,
                max_detection_drop_pts=self.limits.max_detection_drop_pts,
                old_f1_before=self.old_f1_before,
                old_f1_after=self.old_f1_after,
                old_f1_drop_pts=self.old_f1_drop_pts,
                max_old_f1_drop_pts=self.limits.max_old_f1_drop_pts,
            )
        if self.holdout_new_recall is not None:
            out["holdout_new_recall"] = self.holdout_new_recall
            out["min_new_recall"] = self.limits.min_new_recall
        out["passed"] = self.passed
        out["failed"] = list(self.failed)
        return out


def detection_rate(pred: np.ndarray, faults: np.ndarray) -> float:
    """Share of the fault windows (mask ``faults``) predicted as anything but class 0."""
    return float((pred[faults] != 0).mean()) if faults.any() else float("nan")


def judge(
    *,
    golden_labels: np.ndarray,
    candidate: Predictions,
    limits: GateLimits,
    parent: Predictions | None = None,
    holdout_labels: list[str] | None = None,
    holdout_pred: np.ndarray | None = None,
    new_classes: list[str] = (),  # type: ignore[assignment]
) -> GateReport:
    """Judge ``candidate`` on the golden set (labels by name) against ``parent`` and on the
    held-out new uploads:

    - the share of fault windows flagged may fall at most ``max_detection_drop_pts``;
    - the macro-F1 on the classes the parent knew may fall at most ``max_old_f1_drop_pts``;
    - each new class's recall on the held-out uploads must reach ``min_new_recall``.
    """
    names = candidate.class_names
    known = np.isin(golden_labels, names)
    ev = classification_metrics(
        label_indices(golden_labels[known], names), candidate.pred[known], names
    )
    faults = golden_labels != names[0]
    report = GateReport(
        golden_macro_f1=ev.macro_f1,
        detection_rate=detection_rate(candidate.pred, faults),
        limits=limits,
    )
    if parent is not None:
        report.detection_rate_before = detection_rate(parent.pred, faults)
        drop = report.detection_drop_pts
        assert drop is not None
        if drop > limits.max_detection_drop_pts:
            report.failed.append(
                f"detection rate fell {drop:.1f} pts (> {limits.max_detection_drop_pts})"
            )
        old = np.isin(golden_labels, parent.class_names)
        old_labels = golden_labels[old]
        report.old_f1_before = classification_metrics(
            label_indices(old_labels, parent.class_names), parent.pred[old], parent.class_names
        ).macro_f1
        report.old_f1_after = classification_metrics(
            label_indices(old_labels, names), candidate.pred[old], names
        ).macro_f1
        f1_drop = report.old_f1_drop_pts
        assert f1_drop is not None
        if f1_drop > limits.max_old_f1_drop_pts:
            report.failed.append(
                f"old classes' macro-F1 fell {f1_drop:.1f} pts (> {limits.max_old_f1_drop_pts})"
            )
    if holdout_labels:
        assert holdout_pred is not None
        hev = classification_metrics(
            label_indices(np.array(holdout_labels), names), holdout_pred, names
        )
        report.holdout_new_recall = {c: hev.recall[c] for c in new_classes if c in hev.recall}
        report.failed += [
            f"held-out recall of {c} is {v:.2f} (< {limits.min_new_recall})"
            for c, v in report.holdout_new_recall.items()
            if v < limits.min_new_recall
        ]
    return report
