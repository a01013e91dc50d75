"""What garbage collection must never delete, and why: the model versions devices run,
rollouts in flight need (targets, and bases to roll back to or make deltas from), aliases
name or that are among a profile's newest; and the uploads the lineage of a kept version
names (its round's training, validation and held-out windows, what it replayed, and the
replay reservoir the next round from it draws on)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.learn.replay import ReplayBuffer
from cloud.rollout.controller import FINISHED
from cloud.store.db import Device, DeviceUpdate, ModelVersion, Rollout, Round, aware
from cloud.store.keys import replay_key
from cloud.store.objects import ObjectNotFound, ObjectStore
from cloud.tracking.retention import RegistryVersion
from shared.package import model_name

ROUND_FINISHED = ("done", "failed")
IN_FLIGHT = ("pending", "sent")  # device updates offered and not yet answered


@dataclass
class VersionGuard:
    """Why each version of a fleet is protected: (profile, version) → reasons, each
    reading ``rule: detail`` (the plan's table counts by rule)."""

    reasons: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, profile: str, version: str | None, reason: str) -> None:
        if version:
            self.reasons[(profile, version)].append(reason)

    def why(self, profile: str, version: str) -> list[str]:
        return self.reasons.get((profile, version), [])


def fleet_versions(session: Session, fleet: str) -> dict[str, list[ModelVersion]]:
    """profile → the fleet's versions not yet expired, oldest first."""
    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.name.like(f"edgeloop.{fleet}.%"), ModelVersion.expired_at.is_(None))
        .order_by(ModelVersion.id)
    ).all()
    out: dict[str, list[ModelVersion]] = defaultdict(list)
    for mv in rows:
        if mv.name == model_name(fleet, mv.profile):  # not a fleet whose name extends this one
            out[mv.profile].append(mv)
    return out


def guard_versions(
    session: Session,
    fleet: str,
    versions: dict[str, list[ModelVersion]],
    registry: dict[str, list[RegistryVersion]],
    *,
    keep: int,
) -> VersionGuard:
    """Every rule that keeps a version, with its reason. ``registry``: each profile's
    versions as MLflow has them (their aliases)."""
    guard = VersionGuard()
    for profile, version, n in session.execute(
        select(Device.profile, Device.model_version, Device.id)
        .where(Device.fleet == fleet, Device.model_version.is_not(None))
        .order_by(Device.id)
    ):
        guard.add(profile, version, f"device runs it: {n}")
    live = session.scalars(
        select(Rollout).where(Rollout.fleet == fleet, Rollout.state.not_in(FINISHED))
    ).all()
    for r in live:
        guard.add(r.profile, r.target_version, f"rollout target: {r.id} ({r.state})")
        for base in session.scalars(
            select(DeviceUpdate.base_version).where(DeviceUpdate.rollout_id == r.id).distinct()
        ):
            guard.add(r.profile, base, f"rollout base: {r.id} (rollback, deltas)")
    for profile, target, base in session.execute(
        select(Device.profile, DeviceUpdate.target_version, DeviceUpdate.base_version)
        .join(Device, Device.id == DeviceUpdate.device_id)
        .where(Device.fleet == fleet, DeviceUpdate.state.in_(IN_FLIGHT))
    ):
        guard.add(profile, target, "update in flight: to it")
        guard.add(profile, base, "update in flight: from it")
    for profile, rows in versions.items():
        for mv in rows[-keep:]:
            guard.add(profile, mv.version, f"newest {keep}: per profile")
        by_mlflow = {mv.mlflow_version: mv.version for mv in rows}
        for rv in registry.get(profile, []):
            version = by_mlflow.get(rv.mlflow_version) or rv.version
            for alias in rv.aliases:
                guard.add(profile, version, f"alias: {alias}")
    return guard


@dataclass
class SampleGuard:
    """Uploads kept whatever their age: sample id → reasons; ``everything`` a reason that
    keeps all of a fleet's uploads (a round under way), ``labelled`` one that keeps all
    labelled uploads (a kept version whose lineage is unknown)."""

    reasons: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    everything: str | None = None
    labelled: str | None = None

    def add(self, ids: Iterable[str], reason: str) -> None:
        for i in ids:
            self.reasons[i].append(reason)


def round_under_way(session: Session, fleet: str, *, stale_after_s: float) -> Round | None:
    """A round of ``fleet`` not finished that wrote something within ``stale_after_s``."""
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    rows = session.scalars(
        select(Round).where(Round.fleet == fleet, Round.state.not_in(ROUND_FINISHED))
    ).all()
    return next((r for r in rows if aware(r.updated_at) > cutoff), None)


def trained_on(train_output: dict) -> set[str]:
    """The uploads a round's train stage names: what it fit, validated and held out on,
    and the uploads it replayed (replay keys ``sample:<id>``)."""
    ids = {
        row[0] for part in ("fit", "validation", "holdout") for row in train_output.get(part, [])
    }
    ids |= {
        k.removeprefix("sample:")
        for k, *_ in train_output.get("replay", [])
        if k.startswith("sample:")
    }
    return ids


def guard_samples(
    session: Session,
    store: ObjectStore,
    fleet: str,
    kept: dict[str, list[ModelVersion]],
    *,
    stale_after_s: float,
) -> SampleGuard:
    """The uploads of ``fleet`` that the lineage of each ``kept`` version names, and
    those of rounds not yet registered."""
    guard = SampleGuard()
    running = round_under_way(session, fleet, stale_after_s=stale_after_s)
    if running is not None:
        guard.everything = f"round under way: {running.id} ({running.version})"
    rounds = session.scalars(select(Round).where(Round.fleet == fleet)).all()
    by_version = {(r.profile, r.version): r for r in rounds}  # one round a version
    for r in rounds:
        if r.state not in ROUND_FINISHED:
            output = ((r.stages or {}).get("train") or {}).get("output") or {}
            guard.add(trained_on(output), f"round not finished: {r.id} ({r.version})")
    for profile, rows in kept.items():
        for mv in rows:
            row = by_version.get((profile, mv.version))
            stages = (row.stages or {}) if row is not None else {}
            output = (stages.get("train") or {}).get("output") or {}
            if "fit" not in output:
                if mv.parent is not None:  # trained on uploads, but which is not on record
                    guard.labelled = (
                        f"lineage unknown: {profile} {mv.version} (no round records it)"
                    )
                continue
            guard.add(trained_on(output), f"lineage: {profile} {mv.version}")
            guard.add(
                _reservoir(store, fleet, profile, mv.version),
                f"replay reservoir: {profile} {mv.version}",
            )
    return guard


def _reservoir(store: ObjectStore, fleet: str, profile: str, version: str) -> set[str]:
    """The uploads in a version's replay reservoir (what the next round from it replays)."""
    try:
        data = store.get(replay_key(fleet, profile, version))
    except ObjectNotFound:
        return set()
    keys = ReplayBuffer.from_json(data).windows()
    return {k.removeprefix("sample:") for k, _ in keys if k.startswith("sample:")}
