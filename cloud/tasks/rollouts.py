"""The rollouts' tasks: a champion moved (``on_alias``), a step, beat's tick and reconcile,
and the timestamps re-signed; each worker process keeps one transport, a signer per fleet
and one MLflow tracker."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import lru_cache

from cloud.config import get_settings
from cloud.tasks import _services, app

log = logging.getLogger(__name__)


# --- rollouts ---------------------------------------------------------------------------
# Every rollout step is idempotent and holds its rollout's row lock (a second copy skips),
# so these may be delivered twice, run side by side, or die half-way.


@lru_cache(maxsize=1)
def _transport():
    """The worker process's one MQTT transport: offers out, chunks served."""
    from cloud.rollout.transport import RolloutTransport

    _, store, _ = _services()
    transport = RolloutTransport.from_settings(get_settings(), store=store)
    transport.start()
    if not transport.ready.wait(10):
        log.warning("rollout transport not connected yet; offers retry next step")
    return transport


@lru_cache(maxsize=64)
def _signer(fleet: str):
    """The fleet's release signer with the online keys this worker holds."""
    from cloud.rollout.signing import ReleaseSigner

    _, store, _ = _services()
    return ReleaseSigner(store=store, fleet=fleet, keys_dir=get_settings().resolved_tuf_keys_dir)


@lru_cache(maxsize=1)
def _tracker():
    from cloud.tracking.rollouts import open_tracker

    return open_tracker(get_settings())


def _step(rollout_id: int) -> str:
    """One step of a rollout, then its MLflow run brought up to date (MLflow being down
    delays the run's record, never the rollout)."""
    from cloud.rollout import controller
    from cloud.store.db import Rollout

    sessions, store, _ = _services()
    with sessions() as session:
        row = session.get(Rollout, rollout_id)
        if row is None:
            raise controller.RolloutError(f"no rollout {rollout_id}", reason="unknown_rollout")
        fleet = row.fleet
    state = controller.advance(
        sessions=sessions,
        store=store,
        signer=_signer(fleet),
        transport=_transport(),
        rollout_id=rollout_id,
    )
    try:
        controller.track(sessions=sessions, tracker=_tracker(), rollout_id=rollout_id)
    except Exception as exc:  # MLflow is another process: log, go on
        log.warning("rollout %d: MLflow run not updated: %s", rollout_id, exc)
    return state


@app.task(
    name="edgeloop.rollout.on_alias",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=60,
)
def rollout_on_alias(
    self, fleet: str, profile: str, mlflow_version: str, trigger: str = "alias"
) -> dict:
    """A profile's ``champion`` moved to ``mlflow_version``: start (or find) its rollout and
    take its first step now rather than at the next tick."""
    from cloud.rollout.controller import RolloutError, start_rollout

    sessions, _, _ = _services()
    mover = None  # who moved the alias: the version's moved-by tags
    if trigger == "alias":
        # MLflow delivers from a thread pool, and retries: an event can arrive after a newer
        # move of the same alias. Only the version the alias names now is rolled out.
        try:
            current = _tracker().champions().get((fleet, profile))
            mover = _tracker().mover(fleet, profile, str(mlflow_version))
        except Exception as exc:  # noqa: BLE001 - the registry down: trust the event
            log.warning("champion of %s/%s not re-read (%s): trusting the event", fleet,
                        profile, exc)  # fmt: skip
            current, mover = str(mlflow_version), None
        if current != str(mlflow_version):
            log.info("champion event %s/%s → %s is stale (champion is %s): ignored", fleet,
                     profile, mlflow_version, current)  # fmt: skip
            return {"skipped": f"stale: champion of {fleet}/{profile} is {current}"}
    try:
        row = start_rollout(
            sessions=sessions,
            fleet=fleet,
            profile=profile,
            mlflow_version=str(mlflow_version),
            trigger=trigger,
            mover=mover,
        )
    except RolloutError as exc:
        if exc.reason != "unknown_model_version":
            raise
        # The register stage moves the alias before it writes the version's row: the
        # webhook can be first. Wait for the row (the reconcile would catch it too).
        raise self.retry(exc=exc, countdown=5) from exc
    advance_rollout.delay(row.id)
    return {"rollout": row.id, "state": row.state, "target": row.target_version}


@app.task(name="edgeloop.rollout.advance", acks_late=True, reject_on_worker_lost=True)
def advance_rollout(rollout_id: int) -> str:
    """One step of rollout ``rollout_id``; its state after the step."""
    return _step(rollout_id)


@app.task(name="edgeloop.rollout.tick")
def rollout_tick() -> dict[int, str]:
    """Beat's task: a step of every rollout under way (one failing does not stop the rest)."""
    from cloud.rollout.controller import active_rollouts

    sessions, _, _ = _services()
    out = {}
    for rollout_id in active_rollouts(sessions=sessions):
        try:
            out[rollout_id] = _step(rollout_id)
        except Exception as exc:  # logged; the next tick tries again
            log.exception("rollout %d: step failed: %s", rollout_id, exc)
            out[rollout_id] = f"error: {exc}"
    return out


@app.task(name="edgeloop.rollout.reconcile")
def rollout_reconcile() -> list[int]:
    """Beat's task: a champion no rollout carries (a webhook lost) starts its rollout."""
    from cloud.rollout.controller import reconcile

    sessions, _, _ = _services()
    read_at = datetime.now(UTC)
    tracker = _tracker()
    started = reconcile(
        sessions=sessions,
        champions=tracker.champions(),
        read_at=read_at,
        mover_of=tracker.mover,
    )
    for row in started:
        log.info("reconcile started rollout %d (%s/%s %s)", row.id, row.fleet, row.profile,
                 row.target_version)  # fmt: skip
        advance_rollout.delay(row.id)
    return [row.id for row in started]


@app.task(name="edgeloop.rollout.refresh_timestamps")
def refresh_timestamps() -> list[str]:
    """Beat's task: re-sign each fleet's timestamp well inside its expiry."""
    from datetime import timedelta

    from cloud.rollout.controller import refresh_timestamps as refresh

    sessions, _, _ = _services()
    within = timedelta(hours=get_settings().tuf_timestamp_refresh_within_h)
    return refresh(sessions=sessions, signer_for=_signer, within=within)
