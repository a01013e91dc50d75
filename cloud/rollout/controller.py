"""The rollout state machine: a champion carried to a profile's devices in waves, judged
between waves, rolled back by a new signed release when a wave is unhealthy.

Every step re-reads its rows and holds the rollout's row lock, so a step repeated after a
worker was killed redoes only what was not committed: publishing the same assignments
signs nothing new (the same release number), and an offer sent twice is harmless. States:
pending → wave (sending, waiting for statuses, dwelling, judging) → done; or rolling_back
→ aborted; paused; superseded (the champion moved again before it finished)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cloud.config import CloudSettings, get_settings
from cloud.rollout.deltas import lineage, transfers
from cloud.rollout.fleet import fleet_status, status_table
from cloud.rollout.mover import Mover, MoverOf, moved_by, read_mover
from cloud.rollout.settings import RolloutSettings, lock_fleet
from cloud.rollout.steps import Signer, Step, Transport
from cloud.store.db import Device, DeviceUpdate, Fleet, ModelVersion, Rollout, aware
from cloud.store.objects import ObjectStore
from shared.errors import EdgeloopError
from shared.package import model_name

log = logging.getLogger(__name__)

ACTIVE = ("pending", "wave", "paused", "rolling_back")
ADVANCING = ("pending", "wave", "rolling_back")  # what the beat advances
FINISHED = ("done", "aborted", "superseded")
TRANSFERS = "transfers.json"  # per device: payload offered (delta or package), bytes


class RolloutError(EdgeloopError):
    """A rollout cannot do what was asked (unknown_rollout, unknown_model_version, bad_state)."""

    reason = "rollout_error"


def _get(session: Session, rollout_id: int, *, lock: bool = True) -> Rollout:
    q = select(Rollout).where(Rollout.id == rollout_id)
    row = session.scalar(q.with_for_update() if lock else q)
    if row is None:
        raise RolloutError(f"no rollout {rollout_id}", reason="unknown_rollout")
    return row


def start_rollout(
    *,
    sessions: sessionmaker,
    fleet: str,
    profile: str,
    mlflow_version: str,
    trigger: str = "alias",
    settings: CloudSettings | None = None,
    mover: Mover | None = None,
) -> Rollout:
    """A rollout of ``fleet``/``profile`` to its registered ``mlflow_version``, superseding
    the active one. The same version as the newest rollout's returns that rollout while it
    is active or done (a webhook delivered twice), and always for ``reconcile`` (a reconcile
    never retries an aborted model; an operator who sets the alias again does)."""
    name = model_name(fleet, profile)
    with sessions() as session:
        fleet_row = lock_fleet(session, fleet)
        mv = session.scalar(
            select(ModelVersion).where(
                ModelVersion.name == name, ModelVersion.mlflow_version == str(mlflow_version)
            )
        )
        if mv is None:
            raise RolloutError(
                f"{name} version {mlflow_version} has no row in model_versions (register it "
                "with a round or `edgeloop cloud init`)",
                reason="unknown_model_version",
            )
        rollouts = session.scalars(
            select(Rollout)
            .where(Rollout.fleet == fleet, Rollout.profile == profile)
            .order_by(Rollout.id.desc())
        ).all()
        newest = rollouts[0] if rollouts else None
        if (
            newest is not None
            and newest.mlflow_version == str(mlflow_version)
            and trigger != "enrolled"
            and (newest.state in (*ACTIVE, "done") or trigger == "reconcile")
        ):
            return newest
        cfg = RolloutSettings.resolve(settings or get_settings(), fleet_row.settings or {})
        running = Counter(
            d.model_version
            for d in session.scalars(
                select(Device).where(Device.fleet == fleet, Device.profile == profile)
            )
        )
        previous = running.most_common(1)[0][0] if running else None
        row = Rollout(
            model_version_id=mv.id,
            fleet=fleet,
            profile=profile,
            state="pending",
            target_version=mv.version,
            mlflow_version=str(mlflow_version),
            trigger=trigger,
            params={"settings": asdict(cfg), "previous": previous, "sha256": mv.sha256},
            moved_by=moved_by(mover, newest.created_at if newest else None, trigger),
        )
        session.add(row)
        session.flush()
        now = datetime.now(UTC)
        for old in rollouts:
            # A rollout rolling back finishes its rollback first: the new one plans after it.
            if old.state in ("pending", "wave", "paused"):
                old.state, old.finished_at = "superseded", now
                old.reason = f"superseded by rollout {row.id} ({mv.version})"
        session.commit()
        log.info("rollout %d: %s %s (%s) by %s", row.id, name, mv.version, mlflow_version, trigger)
        return row


# --- one step ---------------------------------------------------------------------------


def advance(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    signer: Signer,
    transport: Transport,
    rollout_id: int,
    now: datetime | None = None,
) -> str:
    """One step of rollout ``rollout_id``; returns its state after the step. A rollout
    another worker is stepping right now is left to it."""
    now = now or datetime.now(UTC)
    with sessions() as session:
        # Locks in one order everywhere, fleet row then rollout row (start_rollout too):
        # two transactions never wait on each other in a circle.
        fleet = session.scalar(select(Rollout.fleet).where(Rollout.id == rollout_id))
        if fleet is None:
            raise RolloutError(f"no rollout {rollout_id}", reason="unknown_rollout")
        lock_fleet(session, fleet)
        r = session.scalar(
            select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
        )
        if r is None:
            return _get(session, rollout_id, lock=False).state
        if r.state not in ADVANCING:
            return r.state
        step = Step(session, store, signer, transport, r, now)
        if r.state == "pending":
            step.plan()
        if r.state == "wave":
            step.wave()
        if r.state == "rolling_back":
            step.roll_back()
        session.commit()
        return r.state


# --- operators and the beat ------------------------------------------------------------


def pause(*, sessions: sessionmaker, rollout_id: int) -> Rollout:
    """Stop sending waves (devices already sent finish their install); resume goes on."""
    with sessions() as session:
        r = _get(session, rollout_id)
        if r.state not in ("pending", "wave"):
            raise RolloutError(
                f"rollout {rollout_id} is {r.state}: only a pending or running rollout pauses"
                + (" (a rollback runs to its end)" if r.state == "rolling_back" else ""),
                reason="bad_state",
            )
        r.state = "paused"
        session.commit()
        return r


def resume(*, sessions: sessionmaker, rollout_id: int, now: datetime | None = None) -> Rollout:
    """A paused rollout goes on where it stopped; its wave's timeout starts again."""
    with sessions() as session:
        r = _get(session, rollout_id)
        if r.state != "paused":
            raise RolloutError(f"rollout {rollout_id} is {r.state}, not paused", reason="bad_state")
        r.state = "wave" if r.plan else "pending"
        if r.wave_started_at is not None:
            r.wave_started_at = now or datetime.now(UTC)
        session.commit()
        return r


def abort(
    *,
    sessions: sessionmaker,
    rollout_id: int,
    reason: str = "aborted by an operator",
    now: datetime | None = None,
) -> Rollout:
    """Roll back every device the rollout reached (the next step publishes the release of
    their previous versions); a rollout that reached none is aborted at once."""
    now = now or datetime.now(UTC)
    with sessions() as session:
        r = _get(session, rollout_id)
        if r.state in FINISHED or r.state == "rolling_back":
            raise RolloutError(f"rollout {rollout_id} is already {r.state}", reason="bad_state")
        reached = any(
            u.sent_at is not None
            for u in session.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == r.id))
        )
        r.reason = reason
        if reached:
            r.state, r.wave_started_at = "rolling_back", now
        else:
            r.state, r.finished_at = "aborted", now
        session.commit()
        return r


def active_rollouts(*, sessions: sessionmaker) -> list[int]:
    """Ids of the rollouts the beat steps (paused ones wait for an operator)."""
    with sessions() as session:
        q = select(Rollout.id).where(Rollout.state.in_(ADVANCING)).order_by(Rollout.id)
        return list(session.scalars(q))


def reconcile(
    *,
    sessions: sessionmaker,
    champions: dict[tuple[str, str], str],
    read_at: datetime | None = None,
    mover_of: MoverOf | None = None,  # the version's moved-by tags (cloud.tracking)
) -> list[Rollout]:
    """Start a rollout for each (fleet, profile) whose champion (MLflow version, as the
    caller read it from the registry at ``read_at``) is not the newest rollout's; the ones
    started. A rollout newer than the read was started by a newer champion move than the
    one read: the snapshot is stale there, and that rollout stands."""
    started = []
    for (fleet, profile), mlflow_version in sorted(champions.items()):
        with sessions() as session:
            newest = session.scalar(
                select(Rollout)
                .where(Rollout.fleet == fleet, Rollout.profile == profile)
                .order_by(Rollout.id.desc())
                .limit(1)
            )
        if newest is not None and read_at is not None and aware(newest.created_at) > read_at:
            continue
        trigger = "reconcile"
        if newest is not None and newest.mlflow_version == str(mlflow_version):
            if newest.state != "done" or not newcomers(sessions=sessions, rollout=newest):
                continue
            trigger = "enrolled"  # devices enrolled since the champion went out
        try:
            r = start_rollout(
                sessions=sessions,
                fleet=fleet,
                profile=profile,
                mlflow_version=str(mlflow_version),
                trigger=trigger,
                mover=read_mover(mover_of, fleet, profile, str(mlflow_version), trigger),
            )
        except EdgeloopError as exc:  # one fleet's missing row or bad settings: the others go on
            log.error("reconcile %s/%s: %s", fleet, profile, exc)
            continue
        started.append(r)
    return started


def newcomers(*, sessions: sessionmaker, rollout: Rollout) -> list[str]:
    """Devices of the rollout's fleet and profile it never planned for (enrolled after it),
    online, that do not run its target: the reconcile sends them the champion in a rollout
    of their own, canaries first like any other."""
    with sessions() as session:
        planned = select(DeviceUpdate.device_id).where(DeviceUpdate.rollout_id == rollout.id)
        return list(
            session.scalars(
                select(Device.id).where(
                    Device.fleet == rollout.fleet,
                    Device.profile == rollout.profile,
                    # Heard from (a heartbeat): one enrolled before it is powered on would
                    # be a silent canary of its own rollout, and abort it.
                    Device.online.is_(True),
                    Device.id.not_in(planned),
                    (Device.model_version != rollout.target_version)
                    | Device.model_version.is_(None),
                )
            )
        )


def refresh_timestamps(
    *, sessions: sessionmaker, signer_for: Callable[[str], Any], within: timedelta
) -> list[str]:
    """Re-sign the timestamp (and snapshot) of every fleet whose metadata expires within
    ``within``, each under its fleet's row lock (never beside a publish); the fleets
    re-signed. A fleet without a TUF root yet is skipped."""
    with sessions() as session:
        fleets = list(session.scalars(select(Fleet.id).order_by(Fleet.id)))
    done = []
    for fleet in fleets:
        with sessions() as session:
            lock_fleet(session, fleet)
            try:
                if signer_for(fleet).refresh_timestamp(within=within):
                    done.append(fleet)
            except EdgeloopError as exc:  # no trust yet, or a key missing: say so, go on
                log.warning("timestamp of %s not refreshed: %s", fleet, exc)
            session.commit()
    return done


# --- what it looks like ---------------------------------------------------------------

HEALTH_METRICS = {  # figure of the last judgement → the run's metric
    "anomaly_before": "anomaly_before",
    "anomaly_after": "anomaly_after",
    "p_value": "anomaly_p_value",
    "risk_difference": "anomaly_risk_difference",  # within devices: what the gate compares
    "latency_ms_p99_after": "latency_ms_p99",
    "memory_mb_after": "memory_mb",
    "accuracy_target": "accuracy_target",
    "accuracy_previous": "accuracy_previous",
}


def progress(*, session: Session, rollout: Rollout) -> dict[str, float]:
    """Counts of the rollout's devices by state, how many of the profile's devices run the
    target, and the last judgement's figures: the run's step metrics."""
    states = Counter(
        session.scalars(select(DeviceUpdate.state).where(DeviceUpdate.rollout_id == rollout.id))
    )
    on_target = session.scalars(
        select(Device.id).where(
            Device.fleet == rollout.fleet,
            Device.profile == rollout.profile,
            Device.model_version == rollout.target_version,
        )
    ).all()
    out: dict[str, float] = {"devices_on_target": len(on_target), "wave": rollout.wave}
    for state in ("pending", "sent", "installed", "failed", "rolled_back"):
        out[state] = states.get(state, 0)
    for figure, metric in HEALTH_METRICS.items():
        value = (rollout.health or {}).get(figure)
        if isinstance(value, int | float):
            out[metric] = value
    return out


def track(*, sessions: sessionmaker, tracker: Any, rollout_id: int) -> str:
    """Bring the rollout's MLflow run up to date (a ``cloud.tracking.rollouts.RolloutTracker``):
    created on first call; a step of metrics each call; the fleet-status table and the
    model version's tags when the state or wave changed; ended when the rollout is.
    Returns the run id."""
    with sessions() as session:
        r = _get(session, rollout_id, lock=False)
        metrics = progress(session=session, rollout=r)
        table = status_table(fleet_status(session=session, fleet=r.fleet, profile=r.profile))
        sent, totals = transfers(session, r)
        deltas = lineage(session, fleet=r.fleet, profile=r.profile, version=r.target_version)
    seen = dict((r.params or {}).get("tracked") or {})
    run_id = r.mlflow_run_id or tracker.open_run(
        fleet=r.fleet,
        rollout_id=r.id,
        run_name=f"rollout-{r.id}-{r.profile}-{r.target_version}",
        params={
            "target": r.target_version,
            "mlflow_version": r.mlflow_version,
            "previous": r.params.get("previous"),
            "profile": r.profile,
            "trigger": r.trigger,
            **r.params.get("settings", {}),
        },
    )
    step = int(seen.get("step", -1)) + 1
    tracker.log_step(run_id=run_id, step=step, metrics={**metrics, **totals})
    mark = [r.state, r.wave]
    if mark != seen.get("mark"):
        tracker.log_table(run_id=run_id, columns=table, step=step)
        tracker.log_table(run_id=run_id, columns=sent, step=step, artifact_file=TRANSFERS)
    if r.state in FINISHED and not seen.get("finished"):
        tracker.finish(run_id=run_id, state=r.state, reason=r.reason)
    with sessions() as session:
        row = _get(session, rollout_id)
        row.mlflow_run_id = run_id
        tracked = {"step": step, "mark": mark, "finished": r.state in FINISHED}
        row.params = {**row.params, "tracked": tracked}
        session.commit()
    if mark != seen.get("mark") and r.mlflow_version:
        # Last: a version registered outside MLflow's registry (or deleted) fails only this.
        tracker.tag_version(name=model_name(r.fleet, r.profile),
                            mlflow_version=r.mlflow_version, rollout_id=r.id,
                            state=r.state, deltas=deltas)  # fmt: skip
    return run_id
