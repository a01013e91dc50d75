"""Who is in an ingest group: the broker keeps no list of a shared subscription's members,
so each ingest process records its MQTT client id, replica slot, heartbeat and last batch
in PostgreSQL, and `edgeloop fleet status` reads them back.

A slot is a replica's place in its group (compose's ingest-0, ingest-1; a StatefulSet's
ordinal): its client id is derived from it, so a restarted or recreated replica resumes the
broker session the last one left, whatever its container's host name. One client id is one
broker session: a second live process under it would take the session back and forth. So
a process starting under a client id whose row another process still beats waits the
lease out, and refuses to start if that process is still alive; one whose row a later
process claimed (it looked dead) stops at its next heartbeat (cloud.ingest.service).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from cloud.store.db import IngestMember, IngestSuspect
from shared.errors import ConfigError

log = logging.getLogger(__name__)
LEASE_BEATS = 3  # a member silent for this many of its heartbeats has departed
STOPPED_SHOWN = timedelta(days=1)  # how long `fleet status` lists a cleanly stopped one
# A payload this many ingests died on while handling it alone is dead-lettered unread.
CRASH_LIMIT = 2
SUSPECT_FOR = timedelta(days=1)  # how long a crash counts against a payload


def ingest_client_id(group: str, fleet: str, slot: int) -> str:
    """The MQTT client id of replica ``slot`` of ``group`` (serving ``fleet``, '+': all)."""
    scope = "" if fleet == "+" else f"/{fleet}"
    return f"edgeloop-ingest/{group}{scope}/{slot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Membership:
    """One ingest process's row: claimed at start (the ingest does not start without it),
    beaten while it runs and released on a clean stop (both best effort: a database
    outage never stops a running ingest)."""

    sessions: sessionmaker
    group: str
    fleet: str
    slot: int
    client_id: str
    session_expiry_s: int
    heartbeat_s: float
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    # Tells processes apart where host and pid do not: every container's entrypoint is
    # pid 1, and a StatefulSet's pod keeps its host name.
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def _mine(self):
        return (IngestMember.client_id == self.client_id) & (IngestMember.token == self.token)

    def _holder(self) -> tuple[IngestMember | None, float]:
        """The client id's row and the seconds since its last heartbeat."""
        with self.sessions() as s:
            row = s.get(IngestMember, self.client_id)
            now: datetime = s.scalar(select(func.now()))
        if row is None:
            return None, 0.0
        return row, (_aware(now) - _aware(row.seen_at)).total_seconds()

    def _live_other(self) -> tuple[IngestMember, float] | None:
        """Another process that still beats under this client id, if any."""
        row, age = self._holder()
        if row is None or row.stopped_at is not None or row.token == self.token:
            return None
        if age > LEASE_BEATS * row.heartbeat_s:
            return None  # departed
        if row.host == self.host and (row.pid == self.pid or not _pid_alive(row.pid)):
            return None  # an earlier run on this host (a restarted container is pid 1 again)
        return row, age

    def claim(self, *, poll_s: float | None = None) -> None:
        """Take the client id's row. While another process still beats under it, wait its
        lease out (a killed process stops beating; its restart lands here); ConfigError
        if it is still alive then, naming it (two processes must not share a slot)."""
        held = self._live_other()
        if held is not None:
            row, age = held
            log.warning(
                "client id %s (slot %d) was in use by pid %d on %s %.0f s ago; waiting up to "
                "%.0f s for it to go", self.client_id, self.slot, row.pid, row.host, age,
                LEASE_BEATS * row.heartbeat_s,
            )  # fmt: skip
            deadline = time.monotonic() + LEASE_BEATS * row.heartbeat_s + 1.0
            while held is not None and time.monotonic() < deadline:
                time.sleep(poll_s or min(1.0, row.heartbeat_s / 2))
                held = self._live_other()
            if held is not None:
                row, age = held
                raise ConfigError(
                    f"MQTT client id {self.client_id} (slot {self.slot} of group "
                    f"{self.group!r}) is in use by pid {row.pid} on {row.host}, which still "
                    f"beats ({age:.0f} s ago): give this replica another --slot "
                    "(EDGELOOP_INGEST_SLOT), or stop that one"
                )
        values = {
            "client_id": self.client_id,
            "group": self.group,
            "fleet": self.fleet,
            "slot": self.slot,
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "session_expiry_s": self.session_expiry_s,
            "heartbeat_s": self.heartbeat_s,
            "started_at": func.now(),
            "seen_at": func.now(),
            "stopped_at": None,
            "last_batch_at": None,
            "stored": 0,
            "received": 0,
        }
        with self.sessions() as s:
            dialect = s.get_bind().dialect.name
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            before = s.get(IngestMember, self.client_id, with_for_update=True)
            if before is not None and before.stopped_at is None and before.inflight:
                # The last process under this client id went with a batch in hand. Alone,
                # that payload is what it died on: one more death against it. In a batch,
                # each becomes a suspect, handled alone from now on so a death names it.
                in_hand = sorted(set(before.inflight))
                alone = int(len(in_hand) == 1)
                log.warning(
                    "the last ingest on %s went handling %d message(s); %s",
                    self.client_id, len(in_hand),
                    "one more death against it" if alone else "each handled alone now",
                )  # fmt: skip
                for sha in in_hand:
                    up = insert(IngestSuspect).values(
                        payload_sha256=sha, crashes=alone, last_at=func.now()
                    )
                    s.execute(
                        up.on_conflict_do_update(
                            index_elements=["payload_sha256"],
                            set_={
                                "crashes": IngestSuspect.crashes + alone,
                                "last_at": func.now(),
                            },
                        )
                    )
            stmt = insert(IngestMember).values(**values, inflight=[])
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["client_id"],
                    set_={k: stmt.excluded[k] for k in [*values, "inflight"] if k != "client_id"},
                )
            )
            s.commit()

    def beat(self, *, last_batch_at: float | None, stored: int, received: int) -> bool:
        """Record that this process lives; False when a later process claimed its client id
        (this one looked dead to it)."""
        values = {"seen_at": func.now(), "stored": stored, "received": received}
        if last_batch_at is not None:
            values["last_batch_at"] = datetime.fromtimestamp(last_batch_at, UTC)
        with self.sessions() as s:
            n = s.execute(update(IngestMember).where(self._mine()).values(**values)).rowcount
            s.commit()
        return n == 1

    def hold(self, hashes: list[str]) -> None:
        """Record the payloads of the batch this process is about to handle ([]: none)."""
        with self.sessions() as s:
            s.execute(update(IngestMember).where(self._mine()).values(inflight=hashes))
            s.commit()

    def suspects(self) -> dict[str, int]:
        """Payloads ingests died on in the last day, and how many times."""
        with self.sessions() as s:
            rows = s.execute(
                select(IngestSuspect.payload_sha256, IngestSuspect.crashes).where(
                    IngestSuspect.last_at > datetime.now(UTC) - SUSPECT_FOR
                )
            ).all()
        return {sha: crashes for sha, crashes in rows}

    def acquit(self, sha: str) -> None:
        """A suspect went through alone: the deaths it was counted in were others'."""
        with self.sessions() as s:
            s.execute(delete(IngestSuspect).where(IngestSuspect.payload_sha256 == sha))
            s.commit()

    def release(self) -> None:
        """A clean stop: the client id is free at once, nothing in hand."""
        with self.sessions() as s:
            s.execute(
                update(IngestMember)
                .where(self._mine())
                .values(stopped_at=func.now(), seen_at=func.now(), inflight=[])
            )
            s.commit()


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive UTC; PostgreSQL aware."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass(frozen=True)
class MemberStatus:
    group: str
    fleet: str
    slot: int
    client_id: str
    host: str
    pid: int
    state: str  # live | departed (no heartbeat for LEASE_BEATS of its beats) | stopped
    seen_s: float  # seconds since its last heartbeat
    last_batch_s: float | None  # seconds since its last batch
    stored: int
    session_expiry_s: int


def ingest_members(*, session: Session, fleet: str | None = None) -> list[MemberStatus]:
    """Every ingest that runs, departed, or stopped in the last day (serving ``fleet``, or
    all), by group, fleet and slot."""
    now = _aware(session.scalar(select(func.now())))  # type: ignore[arg-type]
    q = select(IngestMember).order_by(
        IngestMember.group, IngestMember.fleet, IngestMember.slot, IngestMember.started_at
    )
    if fleet:
        q = q.where(IngestMember.fleet.in_(("+", fleet)))
    q = q.where(
        or_(IngestMember.stopped_at.is_(None), IngestMember.stopped_at > now - STOPPED_SHOWN)
    )
    out = []
    for m in session.scalars(q):
        seen = (now - _aware(m.seen_at)).total_seconds()
        if m.stopped_at is not None:
            state = "stopped"
        elif seen > LEASE_BEATS * m.heartbeat_s:
            state = "departed"
        else:
            state = "live"
        batch = m.last_batch_at
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
                last_batch_s=(now - _aware(batch)).total_seconds() if batch else None,
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
