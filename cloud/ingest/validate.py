"""What the ingest accepts: a message decoded from its topic's kind, from a registered
device that names itself, with believable timestamps; and the receipt each message gets."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from cloud.ingest.guard import check_payload
from shared.errors import MessageError
from shared.messages import (
    Ack,
    ChunkRequest,
    Heartbeat,
    LabelMessage,
    SampleMessage,
    UpdateStatus,
    decode,
)
from shared.topics import UPLINK_KINDS

# Chunk requests travel on update-status too; the rollout transport answers them.
Message = SampleMessage | LabelMessage | Heartbeat | UpdateStatus | ChunkRequest
Status = Literal["stored", "duplicate", "rejected", "retry"]


class Receipt(NamedTuple):
    """The outcome for one message; acks are built from these, grouped per device."""

    fleet: str
    device_id: str
    message_id: uuid.UUID
    status: Status
    reason: str | None = None
    retry_after_s: int | None = None  # with status retry: when the device may send it again

    def ack(self) -> Ack:
        return Ack(
            fleet=self.fleet,
            device_id=self.device_id,
            acked_ids=(self.message_id,),
            status=self.status,
            reason=self.reason,
            retry_after_s=self.retry_after_s,
        )


def grouped_acks(receipts: list[Receipt | None]) -> list[Ack]:
    """One ack per device and outcome, listing every message id it covers."""
    grouped: dict[tuple, list[uuid.UUID]] = {}
    for r in receipts:
        if r is not None:
            key = (r.fleet, r.device_id, r.status, r.reason, r.retry_after_s)
            grouped.setdefault(key, []).append(r.message_id)
    return [
        Ack(fleet=fleet, device_id=device, acked_ids=tuple(ids), status=status, reason=reason,
            retry_after_s=retry_after_s)
        for (fleet, device, status, reason, retry_after_s), ids in grouped.items()
    ]  # fmt: skip


# A device buffers for days offline, so old is fine up to a limit; the future is not.
MAX_AGE = timedelta(days=30)
MAX_CLOCK_SKEW = timedelta(minutes=5)
LABEL_PATIENCE = timedelta(hours=1)  # how long a label may wait for its samples


def check_timestamps(msg: object) -> None:
    if isinstance(msg, Heartbeat) and not msg.online:
        return  # a Last Will is stamped when the device connected, maybe long ago
    now = datetime.now(UTC)
    for name in ("sent_at", "captured_at"):
        value = getattr(msg, name, None)
        if value is None:
            continue
        if value > now + MAX_CLOCK_SKEW:
            raise MessageError(
                f"{name} {value.isoformat()} is in the future (device clock?)",
                reason="bad_timestamp",
            )
        if value < now - MAX_AGE:
            raise MessageError(
                f"{name} {value.isoformat()} is older than {MAX_AGE.days} days",
                reason="bad_timestamp",
            )


def validate(
    fleet: str, device: str, kind: str, payload: bytes, registered: Mapping[tuple[str, str], bool]
) -> Message:
    """The message, or MessageError saying why not. ``registered``: each registered
    (fleet, device) and whether it was revoked."""
    if kind not in UPLINK_KINDS:
        raise MessageError(f"devices may not publish {kind}", reason="bad_kind")
    check_payload(payload)  # size and nesting, before any parser
    msg = decode(kind, payload)
    check_timestamps(msg)
    if msg.device_id != device or msg.fleet != fleet:
        raise MessageError(
            f"message claims device {msg.fleet}/{msg.device_id} but was "
            f"published under {fleet}/{device}",
            reason="device_mismatch",
        )
    if (fleet, device) not in registered:
        raise MessageError(f"device {fleet}/{device} is not registered", reason="unknown_device")
    if registered[(fleet, device)]:
        # Its broker login is disabled at once; this covers what was already queued for
        # ingest, or a broker without the dynamic-security plugin.
        raise MessageError(f"device {fleet}/{device} was revoked", reason="device_revoked")
    if isinstance(msg, LabelMessage) and msg.source != "device":
        # Operator labels come from `edgeloop cloud label`, teacher labels from the cloud's
        # rounds: a device claiming either would outrank a human or the teacher.
        raise MessageError(
            f"a device may label only as source 'device', not {msg.source!r}",
            reason="bad_source",
        )
    return msg
