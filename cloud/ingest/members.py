"""Who is in an ingest group: the broker keeps no list of a shared subscription's members,
so each ingest process records its replica slot, MQTT client id, heartbeat and last batch
in PostgreSQL, and `edgeloop fleet status` reads them back.

A slot is a replica's place in its group (compose's ingest-0, ingest-1; a StatefulSet's
ordinal): its client id is derived from it, so a restarted or recreated replica resumes
the broker session the last one left, whatever its container's host name. Two processes
started on one slot are a mistake the broker settles (it disconnects the older one, which
then stops: cloud.ingest.service); the row here names whoever claimed it last.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from cloud.store.db import IngestMember

log = logging.getLogger(__name__)
LEASE_BEATS = 3  # a member silent for this many heartbeats has departed


def ingest_client_id(group: str, fleet: str, slot: int) -> str:
    """The MQTT client id of replica ``slot`` of ``group`` (serving ``fleet``, '+': all)."""
    scope = "" if fleet == "+" else f"/{fleet}"
    return f"edgeloop-ingest/{group}{scope}/{slot}"


@dataclass(frozen=True)
class Membership:
    """One ingest process's row: claimed at start, beaten while it runs, released on a
    clean stop. Every write is best effort: a database outage never stops an ingest."""

    sessions: sessionmaker
    group: str
    fleet: str
    slot: int
    client_id: str
    session_expiry_s: int
    heartbeat_s: float
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def _key(self):
        return (
            (IngestMember.group == self.group)
            & (IngestMember.fleet == self.fleet)
            & (IngestMember.slot == self.slot)
        )

    def claim(self) -> None:
        """Take the slot's row (warning when a live-looking process held it: a killed ingest
        restarting looks the same as two sharing a slot, and the broker tells them apart)."""
        with self.sessions() as s:
            held = s.scalars(select(IngestMember).where(self._key())).first()
            now: datetime = s.scalar(select(func.now()))
            if (
                held is not None
                and held.stopped_at is None
                and (held.host, held.pid) != (self.host, self.pid)
                and now - held.seen_at < timedelta(seconds=LEASE_BEATS * self.heartbeat_s)
            ):
                log.warning(
                    "slot %d of ingest group %r was held by pid %d on %s (heartbeat %.0f s "
                    "ago): taking it over. If that process still runs, the broker "
                    "disconnects it (one client id per slot); give each replica its own "
                    "--slot (EDGELOOP_INGEST_SLOT)",
                    self.slot,
                    self.group,
                    held.pid,
                    held.host,
                    (now - held.seen_at).total_seconds(),
                )
            row = {
                "group": self.group,
                "fleet": self.fleet,
                "slot": self.slot,
                "client_id": self.client_id,
                "host": self.host,
                "pid": self.pid,
                "session_expiry_s": self.session_expiry_s,
                "started_at": func.now(),
                "seen_at": func.now(),
                "stopped_at": None,
                "last_batch_at": None,
                "stored": 0,
                "received": 0,
            }
            stmt = insert(IngestMember).values(**row)
            keys = ("group", "fleet", "slot")
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=list(keys),
                    set_={k: stmt.excluded[k] for k in row if k not in keys},
                )
            )
            s.commit()

    def beat(self, *, last_batch_at: float | None, stored: int, received: int) -> bool:
        """Record that this process lives; False when its row names another process now
        (the slot was claimed by a later one)."""
        values = {"seen_at": func.now(), "stored": stored, "received": received}
        if last_batch_at is not None:
            values["last_batch_at"] = datetime.fromtimestamp(last_batch_at, UTC)
        with self.sessions() as s:
            n = s.execute(
                update(IngestMember)
                .where(self._key(), IngestMember.host == self.host, IngestMember.pid == self.pid)
                .values(**values)
            ).rowcount
            s.commit()
        return n == 1

    def release(self) -> None:
        """A clean stop: the slot is free at once (its broker session still lasts
        ``session_expiry_s``, for the next process on the slot to resume)."""
        with self.sessions() as s:
            s.execute(
                update(IngestMember)
                .where(self._key(), IngestMember.host == self.host, IngestMember.pid == self.pid)
                .values(stopped_at=func.now(), seen_at=func.now())
            )
            s.commit()


@dataclass(frozen=True)
class MemberStatus:
    group: str
    fleet: str
    slot: int
    client_id: str
    host: str
    pid: int
    state: str  # live | departed (no heartbeat for LEASE_BEATS beats) | stopped
    seen_s: float  # seconds since its last heartbeat
    last_batch_s: float | None  # seconds since its last batch
    stored: int
    session_expiry_s: int


def ingest_members(
    *, session: Session, heartbeat_s: float, fleet: str | None = None
) -> list[MemberStatus]:
    """Every ingest that ever claimed a slot (serving ``fleet``, or all), oldest slot first."""
    now: datetime = session.scalar(select(func.now()))  # type: ignore[assignment]
    q = select(IngestMember).order_by(IngestMember.group, IngestMember.fleet, IngestMember.slot)
    if fleet:
        q = q.where(IngestMember.fleet.in_(("+", fleet)))
    out = []
    for m in session.scalars(q):
        seen = (now - m.seen_at).total_seconds()
        if m.stopped_at is not None:
            state = "stopped"
        elif seen > LEASE_BEATS * heartbeat_s:
            state = "departed"
        else:
            state = "live"
        out.append(
            MemberStatus(
                group=m.group,
                fleet=m.fleet,
                slot=m.slot,
                client_id=m.client_id,
                host=m.host,
                pid=m.pid,
                state=state,
                seen_s=seen,
                last_batch_s=(now - m.last_batch_at).total_seconds() if m.last_batch_at else None,
                stored=m.stored,
                session_expiry_s=m.session_expiry_s,
            )
        )
    return out


def format_members(rows: list[MemberStatus]) -> str:
    if not rows:
        return "ingest: no process has started (`edgeloop cloud ingest`)"
    lines = [
        "ingest processes (slot: client id, host/pid, state, heartbeat, last batch, stored "
        "since start; a departed one's broker session ends session_expiry_s after it went):"
    ]
    for r in rows:
        batch = "never" if r.last_batch_s is None else f"{r.last_batch_s:.0f} s ago"
        lines.append(
            f"  {r.group}[{r.slot}] fleet {r.fleet}: {r.client_id}, {r.host}/{r.pid}, "
            f"{r.state}, heartbeat {r.seen_s:.0f} s ago, last batch {batch}, "
            f"{r.stored} stored, session_expiry_s {r.session_expiry_s}"
        )
    return "\n".join(lines)
