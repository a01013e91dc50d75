"""What devices say of themselves: heartbeats (health, versions, capabilities) and the
outcomes of their updates, recorded where `fleet status` and the rollout read them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.store.db import Device, DeviceUpdate
from shared.messages import Heartbeat, UpdateStatus

# What a heartbeat leaves in devices.health: what `fleet status` shows and the rollout judges.
HEALTH_FIELDS = {
    "buffer_depth",
    "windows_seen",
    "anomaly_rate",
    "recent_windows",
    "latency_ms_p50",
    "latency_ms_p99",
    "memory_mb",
    "inference_errors",
    "release",
}


def record_heartbeat(*, session: Session, device: Device, msg: Heartbeat) -> None:
    """The device as its heartbeat describes it (a Last Will: offline)."""
    # Receive time, not sent_at: a Last Will carries the time the device connected.
    device.last_seen = datetime.now(UTC)
    device.online = msg.online
    if msg.model_version is not None:
        device.model_version = msg.model_version
    # beats: heartbeats received while online, which the rollout's dwell counts.
    beats = int((device.health or {}).get("beats", 0)) + int(msg.online)
    device.health = {**msg.model_dump(mode="json", include=HEALTH_FIELDS), "beats": beats}
    if msg.agent_version is not None:
        device.agent_version = msg.agent_version
    if msg.capabilities:
        device.capabilities = list(msg.capabilities)
    session.commit()


# Refusals of an offer whose metadata did not verify for this device: what anyone on the
# network can provoke with a forged or replayed offer naming any version. Recorded, for
# operators, in a row of their own; never as the outcome of a rollout's update.
TRUST_REFUSALS = frozenset(
    {"bad_signature", "missing_metadata", "rollback_attack", "expired_metadata", "mix_and_match"}
)


def record_update_status(*, session: Session, msg: UpdateStatus) -> None:
    """The outcome on the device's newest update to that version: a version can come back
    in a later rollout (champion moved back), and only the newest row is live. A refusal
    of unverified metadata (TRUST_REFUSALS) gets a row outside any rollout instead."""
    if msg.status == "rejected" and msg.reason in TRUST_REFUSALS:
        session.add(
            DeviceUpdate(
                device_id=msg.device_id,
                target_version=msg.target_version,
                state="rejected",
                reason=msg.reason,
            )
        )
        session.commit()
        return
    row = session.scalars(
        select(DeviceUpdate)
        .where(
            DeviceUpdate.device_id == msg.device_id,
            DeviceUpdate.target_version == msg.target_version,
            DeviceUpdate.rollout_id.is_not(None) | DeviceUpdate.state.not_in(["rejected"]),
        )
        .order_by(DeviceUpdate.id.desc())
    ).first()
    if row is None:
        row = DeviceUpdate(device_id=msg.device_id, target_version=msg.target_version)
        session.add(row)
    row.state = "installed" if msg.status == "applied" else msg.status
    row.reason = msg.reason
    if msg.payload is not None:  # what the device did (agents before deltas do not say)
        row.payload, row.received_bytes = msg.payload, msg.received_bytes
        row.delta_refused = msg.delta_refused
    if msg.status == "applied" and row.installed_at is None:
        row.installed_at = datetime.now(UTC)
    device = session.get(Device, msg.device_id)
    if device is not None and msg.running_version:
        device.model_version = msg.running_version
    session.commit()
