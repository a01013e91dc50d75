"""One garbage collection at a time across the cloud: the gc lock in Redis around
``collect`` (the beat task and `edgeloop cloud gc` both take it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import redis
from sqlalchemy.orm import sessionmaker

from cloud.config import CloudSettings
from cloud.learn.lock import RoundLock
from cloud.retention.plan import Plan
from cloud.retention.sweep import Swept, collect
from cloud.store.connect import redis_client
from cloud.store.objects import ObjectStore
from cloud.tracking.retention import RetentionTracker

log = logging.getLogger(__name__)


class GcLock(RoundLock):
    """The round lock's mechanism (SET NX, renewed while held, released only by its
    holder) on one key for the whole cloud."""

    KEY = "edgeloop:gc"

    def __init__(self, client: redis.Redis, *, ttl_s: int = 60) -> None:
        super().__init__(client, "", "", ttl_s=ttl_s)
        self.key = self.KEY


class GcRunning(RuntimeError):
    """Another garbage collection holds the lock."""


def run_gc(
    *,
    settings: CloudSettings,
    sessions: sessionmaker,
    store: ObjectStore,
    tracker: RetentionTracker | None,
    fleet: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    lock: GcLock | None = None,
    locked: bool = True,
    say: Callable[[str], None] = log.info,
) -> list[tuple[Plan, Swept | None]]:
    """``collect`` holding ``lock`` (default: the gc lock on the settings' Redis);
    GcRunning if another collection holds it. A dry run takes no lock: it deletes nothing;
    nor does a run not ``locked`` (one machine without Redis, no worker running)."""
    if dry_run or not locked:
        if not dry_run:
            return collect(settings=settings, sessions=sessions, store=store, tracker=tracker,
                           fleet=fleet, now=now, say=say)  # fmt: skip
        return collect(settings=settings, sessions=sessions, store=store, tracker=tracker,
                       fleet=fleet, dry_run=True, now=now, say=say)  # fmt: skip
    if lock is None:
        lock = GcLock(redis_client(settings), ttl_s=settings.round_lock_ttl_s)
    if not lock.acquire():
        holder = lock.holder()
        raise GcRunning(f"a garbage collection is running (lock {lock.key} held by {holder})")
    try:
        return collect(settings=settings, sessions=sessions, store=store, tracker=tracker,
                       fleet=fleet, now=now, say=say)  # fmt: skip
    finally:
        lock.release()
