"""Dead letters, capped: what a message that cannot be stored leaves behind, bounded in size
and in rate per device, so a device sending garbage cannot fill the store.

Each keeps at most ``dead_letter_max_bytes`` of its payload in the object store, with the
full length and sha256 on its row. Past ``dead_letters_per_device_hour`` rows from one
device in the last hour, no row and no object is written: the device's newest row counts
them by reason (``suppressed``). Rows carry ``received_at``, which retention expires by.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from cloud.ingest.guard import peek_message_id
from cloud.ingest.limits import IngestLimits
from cloud.ingest.validate import Receipt
from cloud.store.db import DeadLetter
from cloud.store.keys import dead_letter_key
from cloud.store.objects import ObjectStore
from shared.errors import MessageError

log = logging.getLogger(__name__)
CAP_WINDOW = timedelta(hours=1)
# Reasons that get no rejected ack: the message names another device than its topic, so
# the device the ack would go to never sent it.
NO_ACK = frozenset({"device_mismatch"})


def record_dead_letter(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    limits: IngestLimits,
    counts: dict[str, int],
    topic_name: str,
    payload: bytes,
    fleet: str | None,
    device: str | None,
    exc: MessageError,
) -> Receipt | None:
    """Record one message that cannot be stored; the rejected receipt its device gets (so
    it drops the message instead of resending it forever), or None. A storage or database
    error propagates: nothing is acked, the batch is retried."""
    reason = str(exc.reason)[:64]
    counts[reason] = counts.get(reason, 0) + 1
    with sessions() as session:
        since = datetime.now(UTC) - CAP_WINDOW
        mine = (
            DeadLetter.device_id == device if device is not None else DeadLetter.device_id.is_(None)
        )
        recent = session.scalar(
            select(func.count()).select_from(DeadLetter).where(mine, DeadLetter.received_at > since)
        )
        if (recent or 0) >= limits.dead_letters_per_device_hour:
            newest = session.scalars(
                select(DeadLetter)
                .where(mine)
                .order_by(DeadLetter.id.desc())
                .limit(1)
                .with_for_update()
            ).first()
            if newest is not None:
                tally = dict(newest.suppressed or {})
                tally[reason] = int(tally.get(reason, 0)) + 1
                newest.suppressed = tally
                session.commit()
            counts["suppressed"] = counts.get("suppressed", 0) + 1
        else:
            key = dead_letter_key()
            # The object first: a row never names an object that is not there.
            store.put(key, payload[: limits.dead_letter_max_bytes])
            session.add(
                DeadLetter(
                    fleet=fleet,
                    device_id=device,
                    topic=topic_name[:300],
                    reason=reason,
                    detail=str(exc)[:2000].replace("\x00", "\\x00"),  # PG text has no NUL
                    payload_key=key,
                    payload_bytes=len(payload),
                    payload_sha256=hashlib.sha256(payload).hexdigest(),
                )
            )
            session.commit()
    log.info("dead letter from %s/%s: %s", fleet, device, exc)
    # A payload ingests died on is never parsed again: its id by pattern only.
    message_id = peek_message_id(payload, parse=reason != "crashed_ingest")
    if fleet and device and message_id and reason not in NO_ACK:
        return Receipt(fleet, device, message_id, "rejected", reason)
    return None
