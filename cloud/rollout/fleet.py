"""The fleet as operators see it: devices with their model, agent, rollout state, health
and traffic (the table `edgeloop fleet status` prints and each rollout's MLflow run keeps);
labels given by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.rollout.health import LabelCounts
from cloud.store.db import DeadLetter, Device, DeviceUpdate, Label, Sample, aware
from cloud.store.records import allowed_labels, upsert_labels
from shared.errors import DataError


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    fleet: str
    profile: str
    model_version: str | None
    online: bool
    last_seen: datetime | None
    samples: int
    labelled: int
    dead_letters: dict[str, int]  # reason → count
    buffer_depth: int | None
    site: str | None = None
    agent_version: str | None = None
    rollout_id: int | None = None  # of the device's newest update
    rollout_state: str | None = None  # pending, sent, installed, failed, rolled_back
    anomaly_rate: float | None = None  # over the live model's recent windows
    latency_ms_p99: float | None = None
    memory_mb: float | None = None


def fleet_status(
    *, session: Session, fleet: str | None = None, profile: str | None = None
) -> list[DeviceStatus]:
    """One row per registered device (of ``fleet`` and ``profile``, or of all), with its
    rollout state, health and traffic counts."""
    q = select(Device)
    if fleet:
        q = q.where(Device.fleet == fleet)
    if profile:
        q = q.where(Device.profile == profile)
    devices = session.scalars(q).all()
    samples = dict(
        session.execute(select(Sample.device_id, func.count()).group_by(Sample.device_id)).all()
    )
    labelled = dict(
        session.execute(
            select(Sample.device_id, func.count(func.distinct(Label.sample_id)))
            .join(Label, Label.sample_id == Sample.id)
            .group_by(Sample.device_id)
        ).all()
    )
    dead: dict[str, dict[str, int]] = {}
    for device_id, reason, n in session.execute(
        select(DeadLetter.device_id, DeadLetter.reason, func.count()).group_by(
            DeadLetter.device_id, DeadLetter.reason
        )
    ):
        dead.setdefault(device_id or "?", {})[reason] = n
    newest = select(func.max(DeviceUpdate.id)).group_by(DeviceUpdate.device_id)
    updates = {
        u.device_id: u
        for u in session.scalars(select(DeviceUpdate).where(DeviceUpdate.id.in_(newest)))
    }
    return [
        DeviceStatus(
            device_id=d.id,
            fleet=d.fleet,
            profile=d.profile,
            model_version=d.model_version,
            online=d.online,
            last_seen=d.last_seen,
            samples=samples.get(d.id, 0),
            labelled=labelled.get(d.id, 0),
            dead_letters=dead.get(d.id, {}),
            buffer_depth=(d.health or {}).get("buffer_depth"),
            site=d.site,
            agent_version=d.agent_version,
            rollout_id=updates[d.id].rollout_id if d.id in updates else None,
            rollout_state=updates[d.id].state if d.id in updates else None,
            anomaly_rate=(d.health or {}).get("anomaly_rate"),
            latency_ms_p99=(d.health or {}).get("latency_ms_p99"),
            memory_mb=(d.health or {}).get("memory_mb"),
        )
        for d in sorted(devices, key=lambda d: (d.fleet, d.id))
    ]


def unknown_device_dead_letters(*, session: Session) -> dict[str, int]:
    """Dead letters from ids no device is registered under, by claimed device id."""
    known = select(Device.id)
    rows = session.execute(
        select(DeadLetter.device_id, func.count())
        .where(DeadLetter.device_id.not_in(known) | DeadLetter.device_id.is_(None))
        .group_by(DeadLetter.device_id)
    ).all()
    return {device_id or "?": n for device_id, n in rows}


def label_samples(
    *, session: Session, sample_ids: list[str], label: str, source: str = "operator"
) -> int:
    """Label uploaded windows by hand; an operator's label replaces their earlier one. The
    class must be in each sample's fleet's allow-list (a typo would otherwise make a class
    of its own): DataError, saying how to extend the list, if not."""
    found = dict(
        session.execute(select(Sample.id, Sample.fleet).where(Sample.id.in_(sample_ids))).all()
    )
    missing = sorted(set(sample_ids) - set(found))
    if missing:
        raise DataError(
            f"no uploaded sample with id {', '.join(missing[:5])}"
            + (" …" if len(missing) > 5 else "")
        )
    for fleet in sorted(set(found.values())):
        allowed = allowed_labels(session, fleet)
        if allowed is not None and label not in allowed:
            raise DataError(
                f"{label!r} is not a class of fleet {fleet} ({', '.join(sorted(allowed))}); "
                f"if it is a new one, add it first: edgeloop fleet classes --fleet {fleet} "
                f"--add {label}",
                reason="label_not_allowed",
            )
    upsert_labels(session=session, sample_ids=sample_ids, label=label, source=source)
    return len(sample_ids)


def label_counts(session: Session, rows: Sequence[DeviceUpdate], target: str) -> LabelCounts:
    """Ground-truth labels (device or operator; an operator's wins) on the wave's samples:
    those its devices classified with the target since installing it, and those they
    classified with their previous version before it was sent."""
    installed = [aware(u.installed_at) for u in rows if u.installed_at is not None]
    base = {u.device_id: u.base_version for u in rows if u.base_version}
    if not installed or not base:
        return LabelCounts()
    q = (
        select(
            Sample.id,
            Sample.device_id,
            Sample.model_version,
            Sample.predicted,
            Sample.received_at,
            Label.label,
            Label.source,
        )  # fmt: skip
        .join(Label, Label.sample_id == Sample.id)
        .where(
            Sample.device_id.in_(list(base)),
            Sample.model_version.in_([target, *set(base.values())]),
            Label.source.in_(("device", "operator")),
        )
        .order_by(Label.source)  # "operator" after "device": it overwrites below
    )
    since = min(installed)
    seen: dict[str, tuple[bool, bool]] = {}  # sample → (on the target, correct)
    for sid, device, version, predicted, received, label, _ in session.execute(q):
        if version == target and aware(received) >= since:
            seen[sid] = (True, predicted == label)
        elif version == base.get(device) and aware(received) < since:
            seen[sid] = (False, predicted == label)
    on_t = [ok for t, ok in seen.values() if t]
    on_p = [ok for t, ok in seen.values() if not t]
    return LabelCounts(sum(on_t), len(on_t), sum(on_p), len(on_p))


def status_table(rows: list[DeviceStatus]) -> dict[str, list[Any]]:
    """The rows as columns (what a rollout's MLflow run logs as its fleet-status table)."""
    out: dict[str, list[Any]] = {}
    for r in rows:
        for key, value in asdict(r).items():
            if key == "dead_letters":
                value = sum(value.values())
            elif isinstance(value, datetime):
                value = value.isoformat()
            out.setdefault(key, []).append(value)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_status(rows: list[DeviceStatus], strangers: dict[str, int]) -> str:
    """The table `edgeloop fleet status` prints."""
    head = (
        f"{'fleet':<12} {'device':<14} {'site':<8} {'profile':<11} {'model':<8} {'agent':<8} "
        f"{'rollout':<16} {'state':<8} {'last seen (UTC)':<20} {'anomaly':>7} {'p99 ms':>7} "
        f"{'mem MB':>7} {'samples':>8} {'labelled':>8} {'buffer':>6}  dead letters"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        seen = r.last_seen.strftime("%Y-%m-%d %H:%M:%S") if r.last_seen else "never"
        dead = ", ".join(f"{k}={v}" for k, v in sorted(r.dead_letters.items())) or "-"
        rollout = r.rollout_state or "-"
        if r.rollout_id is not None:  # a status no rollout asked for has none
            rollout = f"{r.rollout_id}:{rollout}"
        lines.append(
            f"{r.fleet:<12} {r.device_id:<14} {r.site or '-':<8} {r.profile:<11} "
            f"{r.model_version or '-':<8} {r.agent_version or '-':<8} {rollout:<16} "
            f"{'online' if r.online else 'offline':<8} {seen:<20} "
            f"{_fmt(r.anomaly_rate, '.3f'):>7} {_fmt(r.latency_ms_p99, '.2f'):>7} "
            f"{_fmt(r.memory_mb, '.0f'):>7} {r.samples:>8} {r.labelled:>8} "
            f"{'-' if r.buffer_depth is None else r.buffer_depth:>6}  {dead}"
        )
    if strangers:
        lines.append(
            "\nDead letters from unregistered ids: "
            + ", ".join(f"{k}={v}" for k, v in sorted(strangers.items()))
        )
    return "\n".join(lines)
