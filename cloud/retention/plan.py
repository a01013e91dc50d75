"""A fleet's garbage-collection plan: what would go (each item with its objects and
bytes) and what would have gone but is protected, with the reasons (cloud.retention.protect)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from cloud.retention.policy import RetentionPolicy
from cloud.retention.protect import (
    IN_FLIGHT,
    SampleGuard,
    fleet_versions,
    guard_samples,
    guard_versions,
)
from cloud.rollout.controller import FINISHED
from cloud.store.db import (
    DeadLetter,
    Delta,
    DeviceUpdate,
    Label,
    ModelVersion,
    Rollout,
    Sample,
    aware,
)
from cloud.store.keys import checkpoint_key, replay_key, student_key
from cloud.store.objects import ObjectStore, object_size
from cloud.tracking.retention import RegistryVersion, RetentionTracker

KINDS = ("versions", "samples", "dead_letters", "deltas", "mlflow_runs")


@dataclass(frozen=True)
class Item:
    """One thing to delete: ``ident`` names it to the sweep (a sample id, a dead letter or
    delta id, ``profile/version``, a run id); ``ref`` its MLflow version, for versions."""

    kind: str
    ident: str
    bytes: int
    objects: tuple[str, ...] = ()
    ref: str = ""


@dataclass(frozen=True)
class Protected:
    kind: str
    ident: str
    reasons: tuple[str, ...]


@dataclass
class Plan:
    fleet: str | None  # None: the dead letters no fleet could be read from
    policy: RetentionPolicy
    now: datetime
    doomed: list[Item] = field(default_factory=list)
    protected: list[Protected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not planned, and why
    # When the plan read storage (``now`` is the time the ages count from).
    planned_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def of(self, kind: str) -> list[Item]:
        return [i for i in self.doomed if i.kind == kind]

    def table(self) -> list[Row]:
        """Per kind: how many would go and their bytes, how many are protected and by
        which rule (the text before ``:`` of each reason), most frequent first."""
        rows = []
        for kind in KINDS:
            items = self.of(kind)
            kept = [p for p in self.protected if p.kind == kind]
            rules = Counter(r.split(":")[0] for p in kept for r in dict.fromkeys(p.reasons))
            why = ", ".join(f"{rule} ×{n}" for rule, n in rules.most_common())
            rows.append(Row(kind, len(items), sum(i.bytes for i in items), len(kept), why))
        return rows


@dataclass(frozen=True)
class Row:
    """One line of a plan's table."""

    kind: str
    count: int
    bytes: int
    protected: int
    why: str


def plan_fleet(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    tracker: RetentionTracker | None,
    fleet: str,
    policy: RetentionPolicy,
    now: datetime,
    stale_after_s: float,
) -> Plan:
    """What collecting ``fleet`` by ``policy`` would delete now. Without an answer from
    the registry (``tracker`` None or failing) no version and no run is planned: which
    versions an alias names is not known."""
    plan = Plan(fleet, policy, now)
    registry: dict[str, list[RegistryVersion]] | None = None
    if tracker is not None:
        try:
            registry = {
                name.removeprefix(f"edgeloop.{fleet}."): tracker.versions(name)
                for name in tracker.fleet_models(fleet)
            }
        except Exception as exc:  # any failure of the registry: keep every version
            plan.notes.append(f"versions and MLflow runs kept: the registry did not answer ({exc})")
    else:
        plan.notes.append("versions and MLflow runs kept: no registry to read aliases from")
    with sessions() as session:
        versions = fleet_versions(session, fleet)
        kept = dict(versions)
        if registry is not None:
            kept = _plan_versions(session, store, plan, fleet, versions, registry)
        guard = guard_samples(session, store, fleet, kept, stale_after_s=stale_after_s)
        _plan_samples(session, plan, guard, fleet)
        _plan_dead_letters(session, store, plan, fleet)
        _plan_deltas(session, plan, fleet)
    if registry is not None and tracker is not None:
        _plan_runs(sessions, tracker, plan, fleet, registry)
    return plan


def plan_orphan_dead_letters(
    *, sessions: sessionmaker, store: ObjectStore, policy: RetentionPolicy, now: datetime
) -> Plan:
    """The dead letters of messages no fleet could be read from."""
    plan = Plan(None, policy, now)
    with sessions() as session:
        _plan_dead_letters(session, store, plan, None)
    return plan


def _plan_versions(
    session: Session,
    store: ObjectStore,
    plan: Plan,
    fleet: str,
    versions: dict[str, list[ModelVersion]],
    registry: dict[str, list[RegistryVersion]],
) -> dict[str, list[ModelVersion]]:
    """Plan the versions no rule keeps; the versions kept, by profile."""
    guard = guard_versions(session, fleet, versions, registry, keep=plan.policy.versions_keep)
    kept: dict[str, list[ModelVersion]] = defaultdict(list)
    for profile, rows in versions.items():
        for mv in rows:
            ident = f"{profile}/{mv.version}"
            why = guard.why(profile, mv.version)
            if why:
                plan.protected.append(Protected("versions", ident, tuple(why)))
                kept[profile].append(mv)
                continue
            keys = [
                mv.object_key,
                checkpoint_key(fleet, profile, mv.version),
                student_key(fleet, profile, mv.version),
                replay_key(fleet, profile, mv.version),
            ]
            sizes = {k: object_size(store, k) for k in keys}
            objects = tuple(k for k in keys if sizes[k] or store.exists(k))
            plan.doomed.append(
                Item("versions", ident, sum(sizes.values()), objects, mv.mlflow_version or "")
            )
    return kept


def _window_bytes(dtype: str, shape: list[int]) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _plan_samples(session: Session, plan: Plan, guard: SampleGuard, fleet: str) -> None:
    labelled_cut = plan.policy.cutoff(plan.now, plan.policy.samples_days)
    unlabelled_cut = plan.policy.cutoff(plan.now, plan.policy.unlabelled_days)
    has_label = exists().where(Label.sample_id == Sample.id)
    queries: list[tuple[bool, Any, Any]] = []
    if labelled_cut is not None:
        queries.append((True, Sample.received_at < labelled_cut, has_label))
    if unlabelled_cut is not None:
        queries.append((False, Sample.received_at < unlabelled_cut, ~has_label))
    for labelled, older, which in queries:
        rows = session.execute(
            select(Sample.id, Sample.object_key, Sample.dtype, Sample.shape)
            .where(Sample.fleet == fleet, older, which)
            .order_by(Sample.received_at, Sample.id)
            .execution_options(yield_per=2000)
        )
        for sid, key, dtype, shape in rows:
            why = list(guard.reasons.get(sid, ()))
            if guard.everything:
                why.append(guard.everything)
            if labelled and guard.labelled:
                why.append(guard.labelled)
            if why:
                plan.protected.append(Protected("samples", sid, tuple(why)))
            else:
                plan.doomed.append(Item("samples", sid, _window_bytes(dtype, shape), (key,)))


def _plan_dead_letters(session: Session, store: ObjectStore, plan: Plan, fleet: str | None) -> None:
    cut = plan.policy.cutoff(plan.now, plan.policy.dead_letters_days)
    if cut is None:
        return
    which = DeadLetter.fleet.is_(None) if fleet is None else DeadLetter.fleet == fleet
    for dl_id, key in session.execute(
        select(DeadLetter.id, DeadLetter.payload_key)
        .where(which, DeadLetter.received_at < cut)
        .order_by(DeadLetter.id)
    ):
        objects = (key,) if key else ()
        size = sum(object_size(store, k) for k in objects)
        plan.doomed.append(Item("dead_letters", str(dl_id), size, objects))


def _plan_deltas(session: Session, plan: Plan, fleet: str) -> None:
    """Deltas older than the policy's age, and every delta to or from a doomed version;
    kept: the deltas a rollout in flight offers (or may offer: to its target)."""
    cut = plan.policy.cutoff(plan.now, plan.policy.deltas_days)
    gone = {i.ident for i in plan.of("versions")}
    live_targets: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in session.scalars(
        select(Rollout).where(Rollout.fleet == fleet, Rollout.state.not_in(FINISHED))
    ):
        live_targets[(r.profile, r.target_version)].append(f"rollout offers it: {r.id}")
    offered: dict[tuple[str, str], list[str]] = defaultdict(list)
    for base, target, rollout_id in session.execute(
        select(DeviceUpdate.base_version, DeviceUpdate.target_version, DeviceUpdate.rollout_id)
        .join(Rollout, Rollout.id == DeviceUpdate.rollout_id)
        .where(Rollout.fleet == fleet, DeviceUpdate.state.in_(IN_FLIGHT))
    ):
        offered[(base or "", target)].append(f"update in flight: rollout {rollout_id}")
    for d in session.scalars(select(Delta).where(Delta.fleet == fleet).order_by(Delta.id)):
        orphan = {f"{d.profile}/{d.base_version}", f"{d.profile}/{d.target_version}"} & gone
        if not orphan and (cut is None or aware(d.created_at) >= cut):
            continue
        why = live_targets.get((d.profile, d.target_version), []) + offered.get(
            (d.base_version, d.target_version), []
        )
        if why and not orphan:  # a delta to or from a version that goes is of no use
            plan.protected.append(Protected("deltas", str(d.id), tuple(why)))
        else:
            objects = (d.object_key,) if d.length is not None else ()
            plan.doomed.append(Item("deltas", str(d.id), d.length or 0, objects))


def _plan_runs(
    sessions: sessionmaker,
    tracker: RetentionTracker,
    plan: Plan,
    fleet: str,
    registry: dict[str, list[RegistryVersion]],
) -> None:
    """Runs older than the policy's age that no kept version was registered from and no
    rollout in flight writes to."""
    cut = plan.policy.cutoff(plan.now, plan.policy.mlflow_runs_days)
    if cut is None:
        return
    gone = {(i.ident, i.ref) for i in plan.of("versions")}
    needed: dict[str, list[str]] = defaultdict(list)
    for profile, rows in registry.items():
        for rv in rows:
            if rv.run_id and (f"{profile}/{rv.version}", rv.mlflow_version) not in gone:
                needed[rv.run_id].append(f"source of a kept version: {profile} {rv.version}")
    with sessions() as session:
        for rollout_id, run_id in session.execute(
            select(Rollout.id, Rollout.mlflow_run_id).where(
                Rollout.fleet == fleet, Rollout.state.not_in(FINISHED)
            )
        ):
            if run_id:
                needed[run_id].append(f"rollout in flight: {rollout_id}")
    for run in tracker.runs(fleet, started_before=cut):
        why = needed.get(run.run_id, []) + (["still running: -"] if run.status == "RUNNING" else [])
        if why:
            plan.protected.append(Protected("mlflow_runs", run.run_id, tuple(why)))
        else:
            plan.doomed.append(Item("mlflow_runs", run.run_id, tracker.run_bytes(run.run_id)))
