"""A round's choice between the unconstrained package and one kept close to its parent's
(cloud.compress.delta_friendly), so devices download a small delta of what the gates judge.

The constrained package starts from the parent's student (its FP32 checkpoint, stored by the
round that made it), keeps the parent's INT8 grid and lets a rising share of weights move
until it passes the round's check on the VALIDATION set: macro-F1 and every new class's
recall within ``close_tolerance_pts`` of the unconstrained package's there. It is shipped
only if its delta from the parent is also smaller than the unconstrained package's delta.
Otherwise the unconstrained package ships, and the next round starts close to that one.
Either way the package chosen is the one the evaluate stage and the gates then judge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from cloud.compress.delta_friendly import recompress_gated
from cloud.compress.pipeline import CompressionResult
from cloud.learn.state import RoundState, Services
from cloud.model.checkpoint import from_bytes, to_bytes
from cloud.model.evaluation import ArtifactMetrics, evaluate_package
from cloud.model.transformer import SensorTransformer
from cloud.store.keys import package_key, student_key
from cloud.store.objects import ObjectNotFound
from shared import delta as codec
from shared.errors import EdgeloopError
from shared.package import ModelPackage


def keep_student(svc: Services, st: RoundState, student: Any, class_names: list[str]) -> None:
    """Store the student a package was quantized from: the next round starts from it."""
    if isinstance(student, SensorTransformer):
        svc.store.put(student_key(st.fleet, st.profile, st.version), to_bytes(student, class_names))


def within(
    candidate: ArtifactMetrics, reference: ArtifactMetrics, new: list[str], pts: float
) -> bool:
    """The round's check on validation: macro-F1 and each new class's recall no more than
    ``pts`` below the reference's."""
    tol = pts / 100
    if candidate.macro_f1 < reference.macro_f1 - tol:
        return False
    return all(candidate.recall.get(c, 0.0) >= reference.recall.get(c, 0.0) - tol for c in new)


def choose(
    svc: Services,
    st: RoundState,
    *,
    unconstrained: CompressionResult,
    teacher: Any,
    x: np.ndarray,
    y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    class_names: list[str],
    new_classes: list[str],
    say: Callable[[str], None],
) -> tuple[bytes, Any, dict[str, Any]]:
    """The package to ship, the student it came from, and what was tried (for the round's
    record and its MLflow run)."""
    parent = st.outputs["train"]["parent"]
    report: dict[str, Any] = {"strategy": "unconstrained", "parent": parent}
    chosen = (unconstrained.package, unconstrained.student, report)
    if not st.cfg.delta_friendly or parent is None:
        report["why"] = "off" if not st.cfg.delta_friendly else "no parent"
        return chosen
    schemes = set(unconstrained.profile.schemes.values()) - {"fp32"}
    if schemes - {"int8"}:  # the kept grid is ORT's INT8 one
        report["why"] = f"the profile's schemes {sorted(schemes)} are not all INT8"
        return chosen
    try:
        previous = svc.store.get(package_key(st.fleet, st.profile, parent))
        student, _ = from_bytes(svc.store.get(student_key(st.fleet, st.profile, parent)))
    except ObjectNotFound as exc:
        report["why"] = f"the parent's package or student is not stored ({exc})"
        return chosen
    if not isinstance(student, SensorTransformer):
        report["why"] = "the parent's student is not a transformer"
        return chosen
    reference = unconstrained.edge_val

    def accept(package: bytes) -> bool:
        m = evaluate_package(package, val_x, val_y, threads=1, latency_windows=1)
        return within(m, reference, new_classes, st.cfg.close_tolerance_pts)

    started = time.perf_counter()
    try:
        close, steps = recompress_gated(
            previous_package=previous, previous_student=student, teacher=teacher, x=x, y=y,
            class_names=class_names, version=st.version, parent=parent, accept=accept,
        )  # fmt: skip
    except (EdgeloopError, ValueError) as exc:  # e.g. a profile that is not all INT8
        report["why"] = f"no close package: {exc}"
        return chosen
    report["ladder"] = [asdict(s) for s in steps]
    report["close_s"] = round(time.perf_counter() - started, 1)
    ours = len(codec.encode(previous, unconstrained.package))
    report["delta_bytes_unconstrained"] = ours
    if close is None:
        report["why"] = "no rung passed the validation check"
        say(f"delta-friendly: no rung within {st.cfg.close_tolerance_pts} pt on validation")
        return chosen
    theirs = len(codec.encode(previous, close.package))
    report["delta_bytes_close"] = theirs
    if theirs >= ours:
        report["why"] = "its delta is not smaller"
        return chosen
    report.update(strategy="close", why=f"{ours / max(theirs, 1):.1f}x smaller delta")
    say(
        f"delta-friendly: {theirs} bytes from {parent} instead of {ours} "
        f"(package {len(close.package)}); validation within {st.cfg.close_tolerance_pts} pt"
    )
    assert ModelPackage(close.package).version == st.version
    return close.package, close.student, report
