"""The fleet as operators see it: devices with their model, health and traffic; labels
given by hand."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.store.db import DeadLetter, Device, Label, Sample
from cloud.store.records import upsert_labels
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


def fleet_status(*, session: Session, fleet: str | None = None) -> list[DeviceStatus]:
    """One row per registered device (of ``fleet``, or of all), with its traffic counts."""
    devices = session.scalars(
        select(Device).where(Device.fleet == fleet) if fleet else select(Device)
    ).all()
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
    """Label uploaded windows by hand; an operator's label replaces their earlier one."""
    found = set(session.scalars(select(Sample.id).where(Sample.id.in_(sample_ids))))
    missing = sorted(set(sample_ids) - found)
    if missing:
        raise DataError(
            f"no uploaded sample with id {', '.join(missing[:5])}"
            + (" …" if len(missing) > 5 else "")
        )
    upsert_labels(session=session, sample_ids=sample_ids, label=label, source=source)
    return len(sample_ids)


def format_status(rows: list[DeviceStatus], strangers: dict[str, int]) -> str:
    """The table `edgeloop fleet status` prints."""
    head = (
        f"{'fleet':<12} {'device':<14} {'profile':<11} {'model':<8} {'state':<8} "
        f"{'last seen (UTC)':<20} {'samples':>8} {'labelled':>8} {'buffer':>6}  dead letters"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        seen = r.last_seen.strftime("%Y-%m-%d %H:%M:%S") if r.last_seen else "never"
        dead = ", ".join(f"{k}={v}" for k, v in sorted(r.dead_letters.items())) or "-"
        lines.append(
            f"{r.fleet:<12} {r.device_id:<14} {r.profile:<11} "
            f"{r.model_version or '-':<8} {'online' if r.online else 'offline':<8} "
            f"{seen:<20} {r.samples:>8} {r.labelled:>8} "
            f"{'-' if r.buffer_depth is None else r.buffer_depth:>6}  {dead}"
        )
    if strangers:
        lines.append(
            "\nDead letters from unregistered ids: "
            + ", ".join(f"{k}={v}" for k, v in sorted(strangers.items()))
        )
    return "\n".join(lines)
