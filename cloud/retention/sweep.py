"""Garbage collection itself: each fleet's plan (cloud.retention.plan) carried out in
bounded batches, rows before objects, so a crash between the two leaves at worst objects
no row names (listed in a journal the next collection finishes), never a row whose object
is gone. The version rules are read again before versions go; uploads stop going if a
round ran since the plan."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import sessionmaker

from cloud.config import CloudSettings
from cloud.retention.plan import Item, Plan, plan_fleet, plan_orphan_dead_letters
from cloud.retention.policy import RetentionPolicy
from cloud.retention.protect import fleet_versions, guard_versions
from cloud.store.db import (
    DeadLetter,
    Delta,
    Device,
    Fleet,
    Label,
    ModelVersion,
    Round,
    Sample,
    aware,
)
from cloud.store.objects import ObjectStore, StorageError
from cloud.tracking.retention import RetentionTracker
from shared.errors import ConfigError
from shared.package import model_name

log = logging.getLogger(__name__)


@dataclass
class Swept:
    """What one sweep deleted, per kind: items, bytes and objects; and what it skipped."""

    deleted: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, item: Item, objects: int) -> None:
        self.deleted[item.kind] = self.deleted.get(item.kind, 0) + 1
        self.bytes[item.kind] = self.bytes.get(item.kind, 0) + item.bytes
        self.objects[item.kind] = self.objects.get(item.kind, 0) + objects


def known_fleets(sessions: sessionmaker) -> list[str]:
    """Every fleet anything is stored for."""
    names: set[str] = set()
    with sessions() as s:
        for column in (Fleet.id, Device.fleet, Sample.fleet, Delta.fleet, Round.fleet):
            names |= set(s.scalars(select(column).distinct()))
        names |= {f for f in s.scalars(select(DeadLetter.fleet).distinct()) if f}
    return sorted(names)


def policy_of(
    sessions: sessionmaker, settings: CloudSettings, fleet: str | None
) -> RetentionPolicy:
    """The settings' policy with ``fleet``'s overrides (its row's ``retention_*``)."""
    overrides = {}
    if fleet is not None:
        with sessions() as s:
            row = s.get(Fleet, fleet)
            overrides = dict(row.settings or {}) if row is not None else {}
    return RetentionPolicy.resolve(settings, overrides)


def collect(
    *,
    settings: CloudSettings,
    sessions: sessionmaker,
    store: ObjectStore,
    tracker: RetentionTracker | None,
    fleet: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    say: Callable[[str], None] = log.info,
) -> list[tuple[Plan, Swept | None]]:
    """Plan, and unless ``dry_run`` sweep, ``fleet`` (None: every fleet, and the dead
    letters of no fleet). The plans with what each sweep did (None on a dry run)."""
    now = now or datetime.now(UTC)
    stale_after_s = settings.celery_visibility_timeout_s + 600  # as the round tasks judge
    plans = []
    for f in [fleet] if fleet is not None else known_fleets(sessions):
        try:
            policy = policy_of(sessions, settings, f)
        except ConfigError as exc:  # this fleet's overrides are wrong: the others go on
            say(f"gc {f}: not collected: {exc}")
            skipped = Plan(f, policy_of(sessions, settings, None), now)
            skipped.notes.append(f"not collected: {exc}")
            plans.append(skipped)
            continue
        plans.append(
            plan_fleet(
                sessions=sessions,
                store=store,
                tracker=tracker,
                fleet=f,
                policy=policy,
                now=now,
                stale_after_s=stale_after_s,
            )
        )
    if fleet is None:
        policy = policy_of(sessions, settings, None)
        plans.append(
            plan_orphan_dead_letters(sessions=sessions, store=store, policy=policy, now=now)
        )
    if not dry_run:
        left = finish_journals(sessions, store)
        if left:
            say(f"gc: {left} object(s) a collection killed half-way left were deleted")
    out: list[tuple[Plan, Swept | None]] = []
    for plan in plans:
        swept = None if dry_run else sweep(sessions, store, tracker, plan, stale_after_s, say)
        out.append((plan, swept))
    return out


def sweep(
    sessions: sessionmaker,
    store: ObjectStore,
    tracker: RetentionTracker | None,
    plan: Plan,
    stale_after_s: float,
    say: Callable[[str], None] = log.info,
) -> Swept:
    """Carry ``plan`` out: versions, samples, dead letters, deltas, then MLflow runs. If a
    planned version stays (protected since the plan, or the registry failed), the uploads,
    deltas and runs its going would have freed stay too: only dead letters go."""
    swept = Swept()
    intact = True
    if plan.of("versions") and tracker is not None and plan.fleet is not None:
        try:
            intact = _versions(sessions, store, tracker, plan, swept)
        except Exception as exc:  # the registry failed: what is left stays for the next one
            swept.notes.append(f"versions: stopped ({exc})")
            intact = False
    if not intact:
        swept.notes.append(
            "uploads, deltas and runs left for the next collection: a planned version stays"
        )
    if plan.fleet is not None and intact:
        _samples(sessions, store, plan, swept)
    _rows(sessions, store, plan, swept, "dead_letters", DeadLetter)
    if intact:
        _rows(sessions, store, plan, swept, "deltas", Delta)
    if tracker is not None and intact:
        _runs(tracker, plan, swept)
    for kind, n in swept.deleted.items():
        say(f"gc {plan.fleet or '(no fleet)'}: {n} {kind} deleted ({swept.bytes[kind]} bytes)")
    for note in swept.notes:
        say(f"gc {plan.fleet or '(no fleet)'}: {note}")
    return swept


def _runs(tracker: RetentionTracker, plan: Plan, swept: Swept) -> None:
    for item in plan.of("mlflow_runs"):
        try:
            tracker.delete_run(item.ident)
        except Exception as exc:  # MLflow away: the next collection deletes the rest
            swept.notes.append(f"mlflow_runs: stopped at {item.ident} ({exc})")
            return
        swept.count(item, 0)


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _delete_objects(store: ObjectStore, keys: set[str]) -> int:
    """Delete ``keys``; how many went (a failure is logged: the object is left, no row
    names it any more)."""
    done = 0
    for key in sorted(keys):
        try:
            store.delete(key)
            done += 1
        except StorageError as exc:
            log.warning("gc: object %s left behind (%s); no row names it any more", key, exc)
    return done


def _versions(
    sessions: sessionmaker, store: ObjectStore, tracker: RetentionTracker, plan: Plan, swept: Swept
) -> bool:
    """Expire the planned versions that are still unprotected now: the MLflow model
    version, then the objects, then the row is marked expired. Whether all went."""
    assert plan.fleet is not None
    fleet = plan.fleet
    registry = {
        name.removeprefix(f"edgeloop.{fleet}."): tracker.versions(name)
        for name in tracker.fleet_models(fleet)
    }
    with sessions() as s:
        versions = fleet_versions(s, fleet)
        guard = guard_versions(s, fleet, versions, registry, keep=plan.policy.versions_keep)
    intact = True
    for item in plan.of("versions"):
        profile, version = item.ident.split("/", 1)
        if guard.why(profile, version):
            swept.notes.append(f"{item.ident} kept: {'; '.join(guard.why(profile, version))}")
            intact = False
            continue
        if item.ref:
            tracker.delete_version(model_name(fleet, profile), item.ref)
        objects = _delete_objects(store, set(item.objects))
        with sessions() as s:
            s.execute(
                update(ModelVersion)
                .where(ModelVersion.name == model_name(fleet, profile))
                .where(ModelVersion.version == version)
                .values(expired_at=plan.now)
            )
            s.commit()
        swept.count(item, objects)
    return intact


def _samples(sessions: sessionmaker, store: ObjectStore, plan: Plan, swept: Swept) -> None:
    """Delete the planned uploads batch by batch (labels, rows, then each batch object no
    row names any more). Stops if a round ran or started since the plan: its lineage was
    not part of it."""
    for planned in _batches(plan.of("samples"), plan.policy.batch):
        with sessions() as s:
            # Labelled since the plan: planned as unlabelled (a shorter age), kept now.
            fresh = set(
                s.scalars(
                    select(Label.sample_id).where(
                        Label.sample_id.in_([i.ident for i in planned]),
                        Label.created_at >= plan.planned_at,
                    )
                )
            )
        batch = [i for i in planned if i.ident not in fresh]
        ids = [i.ident for i in batch]
        if not ids:
            continue
        with _journal(store, {k for i in batch for k in i.objects}) as keys:
            with sessions() as s:
                touched = s.scalars(select(Round.updated_at).where(Round.fleet == plan.fleet))
                if any(aware(t) >= plan.planned_at for t in touched):
                    swept.notes.append("samples: a round ran since the plan; run gc again")
                    return
                s.execute(delete(Label).where(Label.sample_id.in_(ids)))
                s.execute(delete(Sample).where(Sample.id.in_(ids)))
                s.commit()
            objects = _delete_unnamed(sessions, store, keys)
        for n, item in enumerate(batch):
            swept.count(item, objects if n == 0 else 0)


def _rows(
    sessions: sessionmaker,
    store: ObjectStore,
    plan: Plan,
    swept: Swept,
    kind: str,
    table: type[DeadLetter] | type[Delta],
) -> None:
    """Delete the planned rows of ``table`` batch by batch, then their objects."""
    for batch in _batches(plan.of(kind), plan.policy.batch):
        with _journal(store, {k for i in batch for k in i.objects}) as keys:
            with sessions() as s:
                s.execute(delete(table).where(table.id.in_([int(i.ident) for i in batch])))
                s.commit()
            objects = _delete_unnamed(sessions, store, keys)
        for n, item in enumerate(batch):
            swept.count(item, objects if n == 0 else 0)


# -- the journal: objects whose rows are being deleted ------------------------------------------
# Before a batch's rows go, the keys of their objects are written to an object under
# JOURNAL; it is deleted once the objects are. A collection killed in between leaves the
# journal, and the next one (finish_journals) deletes the objects no row names any more.

JOURNAL = "gc/pending/"


@contextmanager
def _journal(store: ObjectStore, keys: set[str]) -> Iterator[set[str]]:
    key = f"{JOURNAL}{uuid.uuid4()}.json"
    store.put(key, json.dumps(sorted(keys)).encode())
    yield keys
    store.delete(key)


def _named(sessions: sessionmaker, keys: set[str]) -> set[str]:
    """Which of ``keys`` a row still names (an upload, a dead letter, a delta)."""
    named: set[str] = set()
    with sessions() as s:
        for column in (Sample.object_key, DeadLetter.payload_key, Delta.object_key):
            named |= {k for k in s.scalars(select(column).where(column.in_(keys))) if k}
    return named


def _delete_unnamed(sessions: sessionmaker, store: ObjectStore, keys: set[str]) -> int:
    return _delete_objects(store, keys - _named(sessions, keys)) if keys else 0


def finish_journals(sessions: sessionmaker, store: ObjectStore) -> int:
    """Finish what a collection killed half-way left: the objects its journals list that no
    row names any more are deleted, then the journals. How many objects went."""
    done = 0
    for key in store.list(JOURNAL):
        keys = set(json.loads(store.get(key)))
        done += _delete_unnamed(sessions, store, keys)
        store.delete(key)
    return done
