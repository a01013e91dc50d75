"""Delta payloads for a rollout: which devices can take one, each (base, target) pair's
delta made once (shared.delta), kept in the object store, recorded as lineage, signed as a
target of its own beside the package.

A device whose heartbeat lists the ``delta`` capability and reports a registered version
other than the one it is assigned gets, in the same signed release, the package target and
a delta target (kind ``delta``, ``base`` = the sha256 of the package it applies to, the
same ``version``). The device applies the delta only onto a live package with exactly that
hash, and keeps the result only if it is the package's signed hash; otherwise it downloads
the package. A pair whose delta is not smaller than the package gets no delta target.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.rollout.signing import Assignment
from cloud.store.db import Delta, Device, DeviceUpdate, ModelVersion, Rollout
from cloud.store.keys import delta_key
from cloud.store.objects import ObjectNotFound, ObjectStore
from shared import delta as codec
from shared.delta import DeltaError
from shared.errors import EdgeloopError
from shared.package import model_name, sha256_hex

log = logging.getLogger(__name__)
CAPABILITY = "delta"
# "{profile}/{version}.{first 16 hex of the base package's sha256}.edgedelta"
DELTA_PATH = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.([0-9a-f]{16})"
    r"\.edgedelta$"
)


def delta_path(profile: str, target_version: str, base_sha256: str) -> str:
    return f"{profile}/{target_version}.{base_sha256[:16]}.edgedelta"


def object_key_of(fleet: str, path: str) -> str | None:
    """The object-store key of a delta target path; None if ``path`` is not one."""
    match = DELTA_PATH.match(path)
    if match is None:
        return None
    profile, version, base16 = match.groups()
    return delta_key(fleet, profile, version, base16)


class DeltaUnavailable(EdgeloopError):
    """No delta can be made for a pair now (a package gone from the object store, or not
    the bytes its version recorded): its devices take the package."""

    reason = "delta_unavailable"


def _package(store: ObjectStore, mv: ModelVersion) -> bytes:
    """A version's package from the object store, refused unless it is the recorded one."""
    try:
        data = store.get(mv.object_key)
    except ObjectNotFound as exc:
        raise DeltaUnavailable(f"{mv.version}'s package is gone: {exc}") from exc
    if sha256_hex(data) != mv.sha256:
        raise DeltaUnavailable(f"{mv.object_key} is not the package {mv.version} recorded")
    return data


def _encode(base: bytes, target: bytes) -> tuple[bytes | None, dict[str, Any]]:
    """The delta and its stats; None when it is not smaller than the package, or the codec
    cannot make one (a header past its cap)."""
    started = time.perf_counter()
    try:
        data = codec.encode(base, target)
    except DeltaError as exc:
        return None, {"error": str(exc)}
    stats = {**codec.stats(data), "encode_s": round(time.perf_counter() - started, 3)}
    return (data if len(data) < len(target) else None), {**stats, "delta_bytes": len(data)}


def _made(session: Session, fleet: str, base: ModelVersion, target: ModelVersion) -> bool:
    return (
        session.scalar(
            select(Delta.id).where(
                Delta.fleet == fleet,
                Delta.profile == target.profile,
                Delta.base_sha256 == base.sha256,
                Delta.target_sha256 == target.sha256,
            )
        )
        is not None
    )


def delta_record(
    *, session: Session, store: ObjectStore, base: ModelVersion, target: ModelVersion, fleet: str
) -> Delta:
    """The pair's delta row, made now if it is not yet (or made again if its object left
    the store): encoded from the two packages, stored when smaller than the package (else
    ``length`` None). DeltaUnavailable when a package is missing or not what was recorded."""
    row = session.scalar(
        select(Delta).where(
            Delta.fleet == fleet,
            Delta.profile == target.profile,
            Delta.base_sha256 == base.sha256,
            Delta.target_sha256 == target.sha256,
        )
    )
    if row is not None and (row.length is None or store.exists(row.object_key)):
        return row
    target_bytes = _package(store, target)
    data, stats = _encode(_package(store, base), target_bytes)
    key = delta_key(fleet, target.profile, target.version, base.sha256)
    if data is not None:
        store.put(key, data)
    if row is None:
        row = Delta(
            fleet=fleet,
            profile=target.profile,
            base_version=base.version,
            target_version=target.version,
            base_sha256=base.sha256,
            target_sha256=target.sha256,
            object_key=key,
        )
        session.add(row)
    else:
        log.warning("delta %s → %s was gone from the store: made again", base.version,
                    target.version)  # fmt: skip
    row.sha256 = sha256_hex(data) if data is not None else None
    row.length = len(data) if data is not None else None
    row.target_length, row.stats = len(target_bytes), stats
    session.flush()
    log.info(
        "delta %s → %s of %s/%s: %s bytes of %d (%s)",
        base.version,
        target.version,
        fleet,
        target.profile,
        stats.get("delta_bytes", "no"),
        len(target_bytes),
        "offered" if data is not None else "none offered: the package goes",
    )
    return row


def delta_assignments(
    *,
    session: Session,
    store: ObjectStore,
    fleet: str,
    profile: str,
    devices: dict[str, Device],
    assign: dict[str, str],
    version: Callable[[str], ModelVersion | None],
    make: bool = True,
) -> list[Assignment]:
    """The delta targets of a release that gives each device in ``assign`` that version:
    one per (running version, assigned version) pair among the devices that can apply one
    and run another registered version. ``make`` False: only deltas made before (a
    rollback does not wait for an encoding)."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for device_id, wanted in assign.items():
        d = devices.get(device_id)
        if d is None or d.model_version in (None, wanted):
            continue
        if CAPABILITY not in (d.capabilities or []):
            continue
        pairs.setdefault((d.model_version, wanted), []).append(device_id)
    out = []
    for (base_version, target_version), ids in sorted(pairs.items()):
        base, target = version(base_version), version(target_version)
        if base is None or target is None or base.sha256 == target.sha256:
            continue
        if not make and not _made(session, fleet, base, target):
            continue
        try:
            row = delta_record(session=session, store=store, base=base, target=target,
                               fleet=fleet)  # fmt: skip
        except DeltaUnavailable as exc:  # those devices take the package
            log.warning("no delta %s → %s: %s", base_version, target_version, exc)
            continue
        if row.length is None or row.sha256 is None:
            continue
        out.append(
            Assignment(
                path=delta_path(profile, target_version, base.sha256),
                sha256=row.sha256,
                length=row.length,
                fleet=fleet,
                profile=profile,
                version=target_version,
                devices=tuple(sorted(ids)),
                kind="delta",
                base=base.sha256,
            )
        )
    return out


def delta_of(assignments: list[Assignment], device_id: str, version: str) -> Assignment | None:
    """The signed delta target giving ``device_id`` ``version``, if the release has one."""
    for a in assignments:
        if a.kind == "delta" and a.version == version and device_id in a.devices:
            return a
    return None


def transfers(session: Session, rollout: Rollout) -> tuple[dict[str, list[Any]], dict[str, float]]:
    """What each device of a rollout was offered and received (the run's transfer table),
    and the totals as metrics: bytes offered and received, what whole packages would
    have been, and how many devices took a delta."""
    rows = session.scalars(
        select(DeviceUpdate)
        .where(DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.payload.is_not(None))
        .order_by(DeviceUpdate.device_id)
    ).all()
    # Each version's package length, from the deltas made to it (a device offered the
    # package was offered exactly that many bytes).
    full: dict[str, int] = {
        d.target_version: d.target_length
        for d in session.scalars(
            select(Delta).where(Delta.fleet == rollout.fleet, Delta.profile == rollout.profile)
        )
    }
    offered_package = [u for u in rows if u.payload == "package" and not u.delta_refused]
    full.update({u.target_version: u.payload_bytes for u in offered_package if u.payload_bytes})
    columns: dict[str, list[Any]] = {}
    totals = dict.fromkeys(("bytes_offered", "bytes_received", "bytes_full"), 0.0)
    totals["devices_by_delta"] = 0.0
    for u in rows:
        whole = full.get(u.target_version, u.payload_bytes)
        # What the device reported doing (until then, the offer: not counted).
        by_delta = u.payload == "delta" and u.state == "installed"
        row = {
            "device": u.device_id,
            "base": u.base_version,
            "target": u.target_version,
            "payload": u.payload if u.received_bytes is not None else f"{u.payload} (offered)",
            "offered_bytes": u.payload_bytes,
            "received_bytes": u.received_bytes,
            "package_bytes": whole,
            "delta_refused": u.delta_refused or "",
        }
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
        totals["bytes_offered"] += u.payload_bytes or 0
        totals["bytes_received"] += u.received_bytes or 0
        totals["bytes_full"] += whole or 0
        totals["devices_by_delta"] += by_delta
    return columns, totals


def lineage(session: Session, *, fleet: str, profile: str, version: str) -> list[Lineage]:
    """The deltas made to ``version`` from older versions, with the devices that applied
    each one (rollouts' device updates that took the delta and installed)."""
    q = select(Delta).where(
        Delta.fleet == fleet, Delta.profile == profile, Delta.target_version == version
    )
    out = []
    for d in session.scalars(q.order_by(Delta.base_version)):
        base = session.scalar(
            select(ModelVersion.mlflow_version).where(
                ModelVersion.name == model_name(fleet, profile),
                ModelVersion.version == d.base_version,
            )
        )
        devices = session.scalars(
            select(DeviceUpdate.device_id)
            .join(Device, Device.id == DeviceUpdate.device_id)
            .where(
                Device.fleet == fleet,
                DeviceUpdate.target_version == version,
                DeviceUpdate.base_version == d.base_version,
                DeviceUpdate.payload == "delta",
                DeviceUpdate.delta_refused.is_(None),
                DeviceUpdate.state == "installed",
            )
            .distinct()
        ).all()
        out.append(Lineage(d.base_version, base, version, d.length, d.target_length,
                           tuple(sorted(devices))))  # fmt: skip
    return out


@dataclass(frozen=True)
class Lineage:
    """One delta of a version's lineage."""

    base_version: str
    base_mlflow_version: str | None
    target_version: str
    length: int | None  # None: not smaller than the package, never offered
    target_length: int
    devices: tuple[str, ...]  # the devices that installed the target from it
