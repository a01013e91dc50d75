"""When a fleet's next learning round starts: the trigger policies Celery beat checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import median

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.store.db import Device, Label, Round, Sample, aware
from cloud.store.records import latest_version
from shared.package import model_name


@dataclass(frozen=True)
class TriggerPolicy:
    """A round is due when any rule fires (and the fleet has a model to start from):

    - ``min_new_labels`` labelled uploads arrived since the last round;
    - drift: the median anomaly rate the fleet's online devices report in their heartbeats
      is ``anomaly_rate_jump`` above the rate recorded when the last round ran, with at
      least ``drift_min_devices`` devices reporting (the median: one device claiming 1.0
      moves nothing while most of the fleet is calm);
    - schedule: ``max_age_h`` hours passed since the last round and at least one new label
      exists (a quiet fleet is not retrained for nothing).

    Drift needs at least one new label too (a round learns from labels), after a failed
    round none starts for ``backoff_h``, and none starts within ``min_interval_h`` of the
    previous round's start, whatever fires: devices that flip labels or claim anomalies
    cannot start rounds back to back.
    """

    min_new_labels: int = 50
    anomaly_rate_jump: float = 0.2
    max_age_h: float | None = 24 * 7
    backoff_h: float = 1.0  # after a failed round, wait this long before the next
    min_interval_h: float = 1.0  # between the starts of two rounds of a fleet and profile
    drift_min_devices: int = 3


@dataclass
class Due:
    fleet: str
    profile: str
    reasons: list[str] = field(default_factory=list)
    new_labels: int = 0
    anomaly_rate: float | None = None


def device_anomaly_rates(session: Session, fleet: str, profile: str) -> list[float]:
    return [
        float(d.health["anomaly_rate"])
        for d in session.scalars(
            select(Device).where(Device.fleet == fleet, Device.profile == profile, Device.online)
        )
        if d.health and "anomaly_rate" in d.health
    ]


def fleet_anomaly_rate(session: Session, fleet: str, profile: str) -> float | None:
    """The median rate the online devices report (None: none reports)."""
    return _median(device_anomaly_rates(session, fleet, profile))


def _median(rates: list[float]) -> float | None:
    return float(median(rates)) if rates else None


def check(
    *, session: Session, fleet: str, profile: str, policy: TriggerPolicy, now: datetime
) -> Due:
    """Which rules fire for one fleet and profile now (``reasons`` empty: not due)."""
    due = Due(fleet, profile)
    last = latest_version(session, model_name(fleet, profile))
    if last is None:
        return due  # the initial model is trained by hand (`edgeloop demo`, an operator)
    since = aware(last.created_at)
    failed = session.scalars(
        select(Round)
        .where(Round.fleet == fleet, Round.profile == profile, Round.state == "failed")
        .order_by(Round.updated_at.desc())
    ).first()
    if failed is not None and now - aware(failed.updated_at) < timedelta(hours=policy.backoff_h):
        return due  # the last round failed: not again every beat (its error is in the row)
    watermark = (last.baselines or {}).get("label_watermark")
    newer = Label.id > watermark if watermark is not None else Label.created_at > since
    due.new_labels = (
        session.scalar(
            select(func.count())
            .select_from(Label)
            .join(Sample, Sample.id == Label.sample_id)
            # A teacher's pseudo-labels are written by rounds themselves: never a reason
            # for another one.
            .where(Sample.fleet == fleet, newer, Label.source != "teacher")
        )
        or 0
    )
    rates = device_anomaly_rates(session, fleet, profile)
    due.anomaly_rate = _median(rates)
    if due.new_labels >= policy.min_new_labels:
        due.reasons.append(f"new_labels={due.new_labels}")
    baseline = (last.baselines or {}).get("fleet_anomaly_rate")
    if (
        due.anomaly_rate is not None
        and baseline is not None
        and due.new_labels > 0  # a round learns from labels: with none it can only fail
        and len(rates) >= policy.drift_min_devices
        and due.anomaly_rate - float(baseline) >= policy.anomaly_rate_jump
    ):
        due.reasons.append(f"drift: anomaly rate {float(baseline):.2f}→{due.anomaly_rate:.2f}")
    if (
        policy.max_age_h is not None
        and due.new_labels > 0
        and now - since >= timedelta(hours=policy.max_age_h)
    ):
        due.reasons.append(f"schedule: last round {(now - since).total_seconds() / 3600:.0f} h ago")
    started = session.scalar(
        select(func.max(Round.created_at)).where(Round.fleet == fleet, Round.profile == profile)
    )
    if started is not None and now - aware(started) < timedelta(hours=policy.min_interval_h):
        due.reasons = []  # a round started a moment ago: the next waits, whatever fired
    return due


def due_rounds(
    *, session: Session, policy: TriggerPolicy, now: datetime | None = None
) -> list[Due]:
    """Every (fleet, profile) with registered devices whose policy fires now."""
    now = now or datetime.now(UTC)
    pairs = session.execute(select(Device.fleet, Device.profile).distinct()).all()
    out = [check(session=session, fleet=f, profile=p, policy=policy, now=now) for f, p in pairs]
    return [d for d in out if d.reasons]
