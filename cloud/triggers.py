"""When a fleet's next learning round starts: the trigger policies Celery beat checks, and
the lock that lets only one round per fleet and profile run at a time."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.db import Device, Label, ModelVersion, Round, Sample
from cloud.registry import model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggerPolicy:
    """A round is due when any rule fires (and the fleet has a model to start from):

    - ``min_new_labels`` labelled uploads arrived since the last round;
    - drift: the mean anomaly rate the fleet's online devices report in their heartbeats is
      ``anomaly_rate_jump`` above the rate recorded when the last round ran;
    - schedule: ``max_age_h`` hours passed since the last round and at least one new label
      exists (a quiet fleet is not retrained for nothing).

    Drift needs at least one new label too (a round learns from labels), and after a
    failed round none starts for ``backoff_h``.
    """

    min_new_labels: int = 50
    anomaly_rate_jump: float = 0.2
    max_age_h: float | None = 24 * 7
    backoff_h: float = 1.0  # after a failed round, wait this long before the next


@dataclass
class Due:
    fleet: str
    profile: str
    reasons: list[str] = field(default_factory=list)
    new_labels: int = 0
    anomaly_rate: float | None = None


def fleet_anomaly_rate(session: Session, fleet: str, profile: str) -> float | None:
    rates = [
        float(d.health["anomaly_rate"])
        for d in session.scalars(
            select(Device).where(Device.fleet == fleet, Device.profile == profile, Device.online)
        )
        if d.health and "anomaly_rate" in d.health
    ]
    return sum(rates) / len(rates) if rates else None


def check(
    *, session: Session, fleet: str, profile: str, policy: TriggerPolicy, now: datetime
) -> Due:
    """Which rules fire for one fleet and profile now (``reasons`` empty: not due)."""
    due = Due(fleet, profile)
    last = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.name == model_name(fleet, profile))
        .order_by(ModelVersion.id.desc())
    ).first()
    if last is None:
        return due  # the initial model is trained by hand (`edgeloop demo`, an operator)
    since = _aware(last.created_at)
    failed = session.scalars(
        select(Round)
        .where(Round.fleet == fleet, Round.profile == profile, Round.state == "failed")
        .order_by(Round.updated_at.desc())
    ).first()
    if failed is not None and now - _aware(failed.updated_at) < timedelta(hours=policy.backoff_h):
        return due  # the last round failed: not again every beat (its error is in the row)
    watermark = (last.gates or {}).get("label_watermark")
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
    due.anomaly_rate = fleet_anomaly_rate(session, fleet, profile)
    if due.new_labels >= policy.min_new_labels:
        due.reasons.append(f"new_labels={due.new_labels}")
    baseline = (last.gates or {}).get("fleet_anomaly_rate")
    if (
        due.anomaly_rate is not None
        and baseline is not None
        and due.new_labels > 0  # a round learns from labels: with none it can only fail
        and due.anomaly_rate - float(baseline) >= policy.anomaly_rate_jump
    ):
        due.reasons.append(f"drift: anomaly rate {float(baseline):.2f}→{due.anomaly_rate:.2f}")
    if (
        policy.max_age_h is not None
        and due.new_labels > 0
        and now - since >= timedelta(hours=policy.max_age_h)
    ):
        due.reasons.append(f"schedule: last round {(now - since).total_seconds() / 3600:.0f} h ago")
    return due


def due_rounds(
    *, session: Session, policy: TriggerPolicy, now: datetime | None = None
) -> list[Due]:
    """Every (fleet, profile) with registered devices whose policy fires now."""
    now = now or datetime.now(UTC)
    pairs = session.execute(select(Device.fleet, Device.profile).distinct()).all()
    out = [check(session=session, fleet=f, profile=p, policy=policy, now=now) for f, p in pairs]
    return [d for d in out if d.reasons]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class RoundLock:
    """One round per fleet and profile: a Redis key set only if absent (SET NX) with a
    short expiry that the holder renews while it works. A worker that dies holding it
    blocks the next round for ``ttl_s`` at most; only the holder can renew or release it
    (compare-and-act in one Lua call)."""

    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
        "return 0"
    )
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    )

    def __init__(self, client: redis.Redis, fleet: str, profile: str, *, ttl_s: int = 60) -> None:
        self.client = client
        self.key = f"edgeloop:round:{fleet}:{profile}"
        self.token = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock and keep renewing it from a thread until release()."""
        if not self.client.set(self.key, self.token, nx=True, ex=self.ttl_s):
            return False
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.client.eval(self._RENEW, 1, self.key, self.token, self.ttl_s)
            except redis.RedisError:  # Redis away for a moment: the next tick tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.client.eval(self._RELEASE, 1, self.key, self.token)
        except redis.RedisError as exc:  # the key expires by itself within ttl_s
            log.warning("round lock %s not released (%s); it expires in %d s", self.key, exc,
                        self.ttl_s)  # fmt: skip

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
