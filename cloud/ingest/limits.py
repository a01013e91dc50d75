"""Per-device upload quotas: token buckets over bytes and messages, kept in PostgreSQL.

Why PostgreSQL and not Redis: every ingest process already writes each message there, so
the buckets add no service whose outage would stop (or silently unthrottle) ingest; the
rows are shared by every process of a shared subscription and survive restarts; and a
bucket row is locked (``SELECT … FOR UPDATE``, devices in sorted order so two ingests never
deadlock) only for the few milliseconds of one batch's admission, one transaction per batch.

A device over its quota is not refused: its messages get a ``retry`` ack with the seconds
after which the bucket will hold enough, and the device keeps them in its buffer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud.config import CloudSettings
from cloud.store.db import IngestBucket

MAX_RETRY_AFTER_S = 3600


@dataclass(frozen=True)
class IngestLimits:
    """What ingest allows a device (CloudSettings ``ingest_*``; the budgets per fleet)."""

    upload_bytes_per_hour: int = 50_000_000  # the edge's default byte budget
    upload_messages_per_hour: int = 10_000
    quota_factor: float = 4.0
    burst_s: float = 3600.0
    dead_letter_max_bytes: int = 64 << 10
    dead_letters_per_device_hour: int = 100
    fleet_cache_s: float = 60.0  # how long a fleet's budgets and window shape are cached

    @classmethod
    def from_settings(cls, s: CloudSettings) -> IngestLimits:
        return cls(
            upload_bytes_per_hour=s.ingest_upload_bytes_per_hour,
            upload_messages_per_hour=s.ingest_upload_messages_per_hour,
            quota_factor=s.ingest_quota_factor,
            burst_s=s.ingest_quota_burst_s,
            dead_letter_max_bytes=s.ingest_dead_letter_max_bytes,
            dead_letters_per_device_hour=s.ingest_dead_letters_per_device_hour,
        )


class Charge(NamedTuple):
    """One message to admit: its place in the batch, its device, what it costs."""

    at: int
    device_id: str
    nbytes: int
    bytes_per_hour: float  # the device's fleet budgets
    messages_per_hour: float


def admit(
    *,
    session: Session,
    charges: Iterable[Charge],
    limits: IngestLimits,
    now: datetime | None = None,
) -> dict[int, int]:
    """Charge each message to its device's buckets, in order; commit. The messages that do
    not fit, each with the whole seconds after which it would (a device's later messages
    wait behind its first refused one, so it resends them oldest first)."""
    now = now or datetime.now(UTC)
    by_device: dict[str, list[Charge]] = {}
    for charge in charges:
        by_device.setdefault(charge.device_id, []).append(charge)
    if not by_device:
        return {}
    devices = sorted(by_device)
    full = [
        {
            "device_id": d,
            "bytes_tokens": _capacity(by_device[d][0].bytes_per_hour, limits),
            "message_tokens": _capacity(by_device[d][0].messages_per_hour, limits),
            "updated_at": now,
        }
        for d in devices
    ]
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(IngestBucket).values(full).on_conflict_do_nothing())
    rows = session.scalars(
        select(IngestBucket)
        .where(IngestBucket.device_id.in_(devices))
        .order_by(IngestBucket.device_id)
        .with_for_update()
    ).all()
    refused: dict[int, int] = {}
    for row in rows:
        todo = by_device[row.device_id]
        rate_b = _rate(todo[0].bytes_per_hour, limits)
        rate_m = _rate(todo[0].messages_per_hour, limits)
        cap_b, cap_m = rate_b * limits.burst_s, rate_m * limits.burst_s
        updated = row.updated_at if row.updated_at.tzinfo else row.updated_at.replace(tzinfo=UTC)
        elapsed = max(0.0, (now - updated).total_seconds())
        tokens_b = min(cap_b, row.bytes_tokens + rate_b * elapsed)
        tokens_m = min(cap_m, row.message_tokens + rate_m * elapsed)
        waiting = False
        for charge in todo:
            # A message bigger than the whole bucket goes once the bucket is full, leaving
            # it in debt, rather than never.
            need_b, need_m = min(charge.nbytes, cap_b), min(1.0, cap_m)
            # Heartbeats cost no bytes: they pass while only the byte bucket is spent.
            blocked = waiting and charge.nbytes > 0
            if not blocked and tokens_b >= need_b and tokens_m >= need_m:
                tokens_b -= charge.nbytes
                tokens_m -= 1.0
                continue
            waiting = waiting or charge.nbytes > 0
            wait = max((need_b - tokens_b) / rate_b, (need_m - tokens_m) / rate_m, 1.0)
            refused[charge.at] = min(MAX_RETRY_AFTER_S, math.ceil(wait))
        row.bytes_tokens, row.message_tokens, row.updated_at = tokens_b, tokens_m, now
    session.commit()
    return refused


def _rate(per_hour: float, limits: IngestLimits) -> float:
    """Tokens per second."""
    return per_hour * limits.quota_factor / 3600.0


def _capacity(per_hour: float, limits: IngestLimits) -> float:
    return _rate(per_hour, limits) * limits.burst_s
