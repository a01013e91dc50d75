"""Celery app and its thin tasks: ids in, state re-fetched, plain functions do the work."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import worker_init

from cloud.config import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = Celery("edgeloop", broker=settings.redis_url, backend=settings.redis_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=7 * 24 * 3600,
    task_default_queue=settings.celery_queue,
    broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout_s},
    beat_schedule={
        "edgeloop-check-triggers": {
            "task": "edgeloop.check_triggers",
            "schedule": settings.trigger_interval_s,
        },
        # A tick not started within its interval is dropped: the next one does its work.
        "edgeloop-rollout-tick": {
            "task": "edgeloop.rollout.tick",
            "schedule": settings.rollout_tick_s,
            "options": {"expires": settings.rollout_tick_s},
        },
        "edgeloop-rollout-reconcile": {
            "task": "edgeloop.rollout.reconcile",
            "schedule": settings.rollout_reconcile_s,
            "options": {"expires": settings.rollout_reconcile_s},
        },
        "edgeloop-refresh-timestamps": {
            "task": "edgeloop.rollout.refresh_timestamps",
            "schedule": settings.tuf_timestamp_check_s,
            "options": {"expires": settings.tuf_timestamp_check_s},
        },
    },
)


@worker_init.connect
def _start(**_: Any) -> None:
    """A worker brings the schema up to date once, when it starts, and loads the stages'
    libraries (torch, transformers, ONNX): a round's first stage starts at once."""
    from sqlalchemy.exc import SQLAlchemyError

    from cloud.learn import runner  # noqa: F401
    from cloud.store.db import migrate

    try:
        migrate(get_settings().resolved_database_url)
    except SQLAlchemyError as exc:  # the database may be down now and back later
        log.error("schema not brought up to date at start (%s); run `edgeloop cloud migrate`", exc)


def _policy():
    from cloud.learn.triggers import TriggerPolicy

    s = get_settings()
    return TriggerPolicy(
        min_new_labels=s.trigger_min_new_labels,
        anomaly_rate_jump=s.trigger_anomaly_rate_jump,
        max_age_h=s.trigger_max_age_h,
    )


@lru_cache(maxsize=1)
def _services():
    """Sessions, object store and a registry per fleet: opened once per worker process."""
    from cloud.store.db import session_factory
    from cloud.store.objects import open_store
    from cloud.tracking.registry import open_registry

    s = get_settings()
    return (
        session_factory(s.resolved_database_url),
        open_store(s),
        lambda fleet: open_registry(s, fleet),
    )


def round_config(fleet: str, profile: str) -> dict:
    """The settings a round started now runs with (fixed in its row when it is reserved)."""
    from cloud.learn.state import RoundConfig

    return RoundConfig.from_settings(get_settings(), fleet=fleet, profile=profile).to_dict()


def round_chain(round_id: int, stages: list[str] | None = None):
    """The chain of stage tasks of a round, from the first of ``stages`` (default: all)."""
    from celery import chain

    from cloud.learn.state import STAGES

    todo = stages or list(STAGES)
    return chain(*(STAGE_TASKS[stage].si(round_id) for stage in todo))


# acks_late everywhere: a task's message stays in Redis until the task has finished, so a
# stage whose worker was killed is delivered again (after the broker's visibility timeout)
# with the rest of the chain; the rounds table makes each stage run to completion once.
@app.task(name="edgeloop.retrain", bind=True, acks_late=True, reject_on_worker_lost=True)
def retrain(self, fleet: str, profile: str = "cpu-fp32", reason: str = "manual") -> dict:
    """Start one learning round for ``fleet`` / ``profile``: reserve its version, then become
    the chain train → recompress → evaluate → register (this task's result is the chain's:
    the new version and its gates).

    At most one round per fleet and profile is under way. A round a trigger asked for checks
    under the lock that it is still due, so two triggers that fire together, or one that
    fires again while a round runs, give one round."""
    import redis
    from sqlalchemy import select

    from cloud.learn import rounds
    from cloud.learn.lock import RoundLock
    from cloud.learn.triggers import check
    from cloud.store.db import Round

    task_id = self.request.id or "eager"
    s = get_settings()
    sessions, _, _ = _services()
    with sessions() as session:
        known = session.scalar(select(Round).where(Round.task_id == task_id))
    if known is not None and known.state == "done" and known.result is not None:
        return known.result  # delivered again after it finished: the same answer
    lock = RoundLock(redis.Redis.from_url(s.redis_url), fleet, profile, ttl_s=s.round_lock_ttl_s)
    if not lock.acquire():
        if known is not None:
            # Delivered again after its worker died: the dead worker's lock expires within
            # round_lock_ttl_s. Try again then, rather than lose the round.
            raise self.retry(countdown=max(1, s.round_lock_ttl_s // 2), max_retries=20)
        log.info("round for %s/%s skipped: another one is running", fleet, profile)
        return {"skipped": f"a round for {fleet}/{profile} is already running"}
    try:
        if known is None:
            other = rounds.active_round(
                sessions, fleet, profile, stale_after_s=s.celery_visibility_timeout_s + 600
            )
            if other is not None:
                return {
                    "skipped": f"a round for {fleet}/{profile} is already running "
                    f"({other.version}, stage {other.state}, round {other.id})"
                }
            if reason != "manual":
                with sessions() as session:
                    due = check(
                        session=session,
                        fleet=fleet,
                        profile=profile,
                        policy=_policy(),
                        now=datetime.now(UTC),
                    )
                if not due.reasons:
                    return {"skipped": f"{fleet}/{profile} is no longer due ({reason})"}
                reason = "; ".join(due.reasons)
        row = rounds.reserve(
            sessions=sessions,
            task_id=task_id,
            fleet=fleet,
            profile=profile,
            reason=reason,
            config=round_config(fleet, profile),
        )
    finally:
        lock.release()
    left = rounds.resume(sessions, row.id)
    if not left:  # delivered again after its chain finished the round
        return rounds.finish_if_done(sessions, row.id)
    log.info("round %d (%s/%s %s) starts at %s: %s", row.id, fleet, profile, row.version,
             left[0], reason)  # fmt: skip
    raise self.replace(round_chain(row.id, left))


def _stage(task, round_id: int, stage: str) -> dict:
    """Run ``stage`` of round ``round_id`` holding the fleet's round lock (a copy of the same
    task delivered while the first still runs waits for it, then finds the stage done)."""
    import redis

    from cloud.learn.lock import RoundLock
    from cloud.learn.rounds import finish_if_done, state_of
    from cloud.learn.runner import run_stage
    from cloud.learn.state import STAGES, Services

    s = get_settings()
    sessions, store, registry = _services()
    st = state_of(sessions, round_id)
    lock = RoundLock(
        redis.Redis.from_url(s.redis_url), st.fleet, st.profile, ttl_s=s.round_lock_ttl_s
    )
    if not lock.acquire():
        # Another copy of this round's work holds it (or a dead worker did, until its
        # key expires): wait, then find the stage done or run it.
        raise task.retry(countdown=max(1, s.round_lock_ttl_s // 2))
    try:
        out = run_stage(Services(sessions, store, registry(st.fleet)), round_id, stage)
    finally:
        lock.release()
    if stage == STAGES[-1]:
        return finish_if_done(sessions, round_id)
    return {"round": round_id, "stage": stage, "outputs": sorted(out)}


# Every stage task: its message kept until it finished (redelivered with the rest of the
# chain if its worker dies), and waiting for the lock as long as the holder works.
STAGE_TASK_OPTIONS = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
}


@app.task(name="edgeloop.round.train", **STAGE_TASK_OPTIONS)
def train_stage(self, round_id: int) -> dict:
    """Fine-tune the teacher on new labels + replay (cloud.learn.train)."""
    return _stage(self, round_id, "train")


@app.task(name="edgeloop.round.recompress", **STAGE_TASK_OPTIONS)
def recompress_stage(self, round_id: int) -> dict:
    """The teacher → the profile's edge package (cloud.learn.recompress)."""
    return _stage(self, round_id, "recompress")


@app.task(name="edgeloop.round.evaluate", **STAGE_TASK_OPTIONS)
def evaluate_stage(self, round_id: int) -> dict:
    """The package under ONNX Runtime against the gates (cloud.learn.evaluate)."""
    return _stage(self, round_id, "evaluate")


@app.task(name="edgeloop.round.register", **STAGE_TASK_OPTIONS)
def register_stage(self, round_id: int) -> dict:
    """MLflow run, model version, aliases; the round's answer (cloud.learn.register)."""
    return _stage(self, round_id, "register")


STAGE_TASKS = {
    "train": train_stage,
    "recompress": recompress_stage,
    "evaluate": evaluate_stage,
    "register": register_stage,
}


@app.task(name="edgeloop.resume_round", bind=True)
def resume_round(self, round_id: int) -> dict:
    """Run a failed or stalled round again from its first stage not done; a round still
    under way is left to its chain."""
    import redis

    from cloud.learn import rounds
    from cloud.learn.lock import RoundLock

    s = get_settings()
    sessions, _, _ = _services()
    st = rounds.state_of(sessions, round_id)
    lock = RoundLock(
        redis.Redis.from_url(s.redis_url), st.fleet, st.profile, ttl_s=s.round_lock_ttl_s
    )
    if not lock.acquire():
        return {"skipped": f"round {round_id} is running; nothing to resume"}
    try:
        # Holding the lock means no stage of this fleet and profile is running; a round
        # whose chain died without a word is resumed at once. Another round under way is
        # left alone.
        running = rounds.active_round(
            sessions, st.fleet, st.profile, stale_after_s=s.celery_visibility_timeout_s + 600
        )
        if running is not None and running.id != round_id:
            return {
                "skipped": f"round {running.id} of {st.fleet}/{st.profile} is under way "
                f"({running.state}); resume round {round_id} after it"
            }
        left = rounds.resume(sessions, round_id)
    finally:
        lock.release()
    if not left:
        return rounds.finish_if_done(sessions, round_id)
    raise self.replace(round_chain(round_id, left))


@app.task(name="edgeloop.check_triggers")
def check_triggers() -> list[dict]:
    """Beat's task: start a round for every fleet and profile whose policy fires."""
    from cloud.learn.triggers import due_rounds

    sessions, _, _ = _services()
    with sessions() as session:
        due = due_rounds(session=session, policy=_policy())
    for d in due:
        log.info("trigger for %s/%s: %s", d.fleet, d.profile, "; ".join(d.reasons))
        retrain.delay(d.fleet, d.profile, reason="; ".join(d.reasons))
    return [asdict(d) for d in due]


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
    if trigger == "alias":
        # MLflow delivers from a thread pool, and retries: an event can arrive after a newer
        # move of the same alias. Only the version the alias names now is rolled out.
        try:
            current = _tracker().champions().get((fleet, profile))
        except Exception as exc:  # noqa: BLE001 - the registry down: trust the event
            log.warning("champion of %s/%s not re-read (%s): trusting the event", fleet,
                        profile, exc)  # fmt: skip
            current = str(mlflow_version)
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
    started = reconcile(sessions=sessions, champions=_tracker().champions(), read_at=read_at)
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
