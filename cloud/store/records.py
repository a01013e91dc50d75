"""Rows other parts write and read: fleets and their devices, labels, and the fleet's model
versions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.store.db import Device, Fleet, Label, ModelVersion
from shared.errors import DataError
from shared.package import model_name


def register_device(*, session: Session, device_id: str, fleet: str, profile: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, fleet=fleet, profile=profile)
        session.add(device)
    else:
        device.fleet, device.profile = fleet, profile
    session.commit()
    return device


def upsert_labels(*, session: Session, sample_ids: list[str], label: str, source: str) -> None:
    """Set the label of each sample from ``source``; a later label from the same source
    replaces the earlier one (one row per sample and source)."""
    existing = {
        lab.sample_id: lab
        for lab in session.scalars(
            select(Label).where(Label.sample_id.in_(sample_ids), Label.source == source)
        )
    }
    changed = [lab for sid, lab in existing.items() if lab.label != label]
    for lab in changed:
        # A new row, not an edit: its new id is what tells the next round (and the
        # triggers) that this sample has something new to teach.
        session.delete(lab)
    session.flush()
    for sid in dict.fromkeys(sample_ids):
        if sid not in existing or existing[sid] in changed:
            session.add(Label(sample_id=sid, label=label, source=source))
    session.commit()


# -- model versions: one row per version a round registered, newest last -----------------------


def latest_version(session: Session, name: str) -> ModelVersion | None:
    """The newest version of model ``name``, passed or not."""
    return session.scalars(
        select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id.desc())
    ).first()


def find_version(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def version_row(sessions: sessionmaker, name: str, version: str) -> ModelVersion:
    """Version ``version`` of model ``name``; DataError if it was never registered."""
    with sessions() as session:
        row = find_version(session, name, version)
    if row is None:
        raise DataError(f"{name} has no version {version}")
    return row


def champion_row(sessions: sessionmaker, name: str) -> ModelVersion | None:
    """The newest version of model ``name`` that passed its gates."""
    with sessions() as session:
        rows = session.scalars(
            select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id.desc())
        )
        return next((r for r in rows if (r.gates or {}).get("passed")), None)


def next_version(sessions: sessionmaker, name: str) -> str:
    """The version the next round of model ``name`` registers: v1, v2, …"""
    with sessions() as session:
        n = session.scalar(
            select(func.count()).select_from(ModelVersion).where(ModelVersion.name == name)
        )
    return f"v{(n or 0) + 1}"


def label_watermark(sessions: sessionmaker) -> int:
    """The highest label id such that every label up to it is committed: what a round
    learns from, and where the triggers start counting new labels. On PostgreSQL, ids are
    handed out before commit, so a lower id can still be in flight when a higher one is
    visible; a SHARE lock on the table waits for the writers that hold one."""
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL lock_timeout = '15s'"))
            try:
                session.execute(text("LOCK TABLE labels IN SHARE MODE"))
            except OperationalError as exc:
                raise DataError(
                    "the labels table stayed locked for 15 s (a transaction writing labels "
                    "left open?); the round stops, resume it once that transaction ends"
                ) from exc
        watermark = session.scalar(select(func.max(Label.id))) or 0
        session.commit()  # releases the lock
    return int(watermark)


# -- fleets and enrollment: the fleet's row (allow-list, settings) and its devices ------------


def get_fleet(session: Session, fleet: str) -> Fleet | None:
    return session.get(Fleet, fleet)


def create_fleet(
    *, session: Session, fleet: str, classes: list[str], settings: dict[str, Any] | None = None
) -> Fleet:
    """The fleet's row with its class allow-list; DataError (``fleet_exists``) if it has one."""
    if session.get(Fleet, fleet) is not None:
        raise DataError(f"fleet {fleet!r} exists already", reason="fleet_exists")
    row = Fleet(id=fleet, classes=list(dict.fromkeys(classes)), settings=dict(settings or {}))
    session.add(row)
    session.commit()
    return row


def update_fleet_settings(*, session: Session, fleet: str, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the fleet's settings (a new dict, so the JSON column is written)."""
    row = _fleet_or_fail(session, fleet)
    row.settings = {**(row.settings or {}), **values}
    session.commit()
    return row.settings


def allow_classes(*, session: Session, fleet: str, add: list[str]) -> list[str]:
    """Extend the fleet's allow-list with ``add`` (kept in order, no repeats); the new list."""
    row = _fleet_or_fail(session, fleet)
    row.classes = list(dict.fromkeys([*(row.classes or []), *add]))
    session.commit()
    return row.classes


def allowed_labels(session: Session, fleet: str) -> frozenset[str] | None:
    """The classes a device of ``fleet`` may label; None: any (a fleet without a row, as
    before fleets had one, or whose row sets no list: one a rollout created before
    `edgeloop cloud init` ran)."""
    row = session.get(Fleet, fleet)
    return None if row is None or not row.classes else frozenset(row.classes)


def enroll_device(
    *,
    session: Session,
    device_id: str,
    fleet: str,
    profile: str,
    site: str | None = None,
    tags: dict[str, str] | None = None,
) -> Device:
    """Register a device of an initialised fleet, for a profile the fleet has a promoted
    model of, with its site and tags. Enrolling it again (same fleet) updates them; a
    device of another fleet is refused rather than moved behind its operators' backs."""
    _fleet_or_fail(session, fleet)
    name = model_name(fleet, profile)
    models = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).all()
    if not any((m.gates or {}).get("passed") for m in models):
        raise DataError(
            f"fleet {fleet!r} has no promoted model for profile {profile!r}: run "
            f"`edgeloop cloud init --fleet {fleet} --profile {profile} ...` (or a round for "
            "that profile) first",
            reason="unknown_profile",
        )
    device = session.get(Device, device_id)
    if device is not None and device.fleet != fleet:
        raise DataError(
            f"device {device_id!r} is enrolled in fleet {device.fleet!r}; retire it there first",
            reason="device_in_other_fleet",
        )
    if device is None:
        device = Device(id=device_id, fleet=fleet)
        session.add(device)
    device.profile, device.site, device.tags = profile, site, dict(tags or {})
    session.commit()
    return device


def _fleet_or_fail(session: Session, fleet: str) -> Fleet:
    row = session.get(Fleet, fleet)
    if row is None:
        raise DataError(
            f"fleet {fleet!r} does not exist: run `edgeloop cloud init --fleet {fleet} ...` first",
            reason="unknown_fleet",
        )
    return row


# -- Broker identity (issue 15) ---------------------------------------------------------------
def record_credentials(*, session: Session, device_id: str, username: str) -> Device:
    """Note that broker credentials were issued to a device (the fact, the username and
    the time; the password is never stored). Issuing them lifts a revocation."""
    device = _enrolled(session, device_id)
    device.broker_username = username
    device.credentials_issued_at = datetime.now(UTC)
    device.revoked_at = None
    session.commit()
    return device


def revoke_device(*, session: Session, device_id: str) -> Device:
    """Mark a device revoked (kept: it stays revoked when revoked again)."""
    device = _enrolled(session, device_id)
    if device.revoked_at is None:
        device.revoked_at = datetime.now(UTC)
        session.commit()
    return device


def is_revoked(session: Session, device_id: str) -> bool:
    """Whether ingest must refuse this device's messages (reason ``device_revoked``)."""
    return session.scalar(select(Device.revoked_at).where(Device.id == device_id)) is not None


def _enrolled(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise DataError(f"device {device_id!r} is not enrolled", reason="unknown_device")
    return device


# -- end broker identity
