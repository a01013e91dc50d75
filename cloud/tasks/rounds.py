"""The learning rounds' tasks: ``edgeloop.retrain`` (reserve, then the chain of stage
tasks), the stages, resume, and beat's trigger check."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime

from cloud.config import get_settings
from cloud.tasks import _services, app

log = logging.getLogger(__name__)


def _policy():
    from cloud.learn.triggers import TriggerPolicy

    s = get_settings()
    return TriggerPolicy(
        min_new_labels=s.trigger_min_new_labels,
        anomaly_rate_jump=s.trigger_anomaly_rate_jump,
        max_age_h=s.trigger_max_age_h,
        min_interval_h=s.trigger_min_interval_h,
        drift_min_devices=s.trigger_drift_min_devices,
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
def retrain(
    self,
    fleet: str,
    profile: str = "cpu-fp32",
    reason: str = "manual",
    outage_since: float | None = None,
) -> dict:
    """Start one learning round for ``fleet`` / ``profile``: reserve its version, then become
    the chain train → recompress → evaluate → register (this task's result is the chain's:
    the new version and its gates).

    At most one round per fleet and profile is under way. A round a trigger asked for checks
    under the lock that it is still due, so two triggers that fire together, or one that
    fires again while a round runs, give one round. An outage of the database or Redis is
    waited out (round_outage_patience_s), as the stages do."""
    return _through_outages(self, outage_since, lambda: _retrain(self, fleet, profile, reason))


def _retrain(self, fleet: str, profile: str, reason: str) -> dict:
    from sqlalchemy import select

    from cloud.learn import rounds
    from cloud.learn.lock import RoundLock
    from cloud.learn.triggers import check
    from cloud.store.connect import redis_client
    from cloud.store.db import Round

    task_id = self.request.id or "eager"
    s = get_settings()
    sessions, _, _ = _services()
    with sessions() as session:
        known = session.scalar(select(Round).where(Round.task_id == task_id))
    if known is not None and known.state == "done" and known.result is not None:
        return known.result  # delivered again after it finished: the same answer
    lock = RoundLock(redis_client(s), fleet, profile, ttl_s=s.round_lock_ttl_s)
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


def _through_outages(task, outage_since: float | None, work, *, round_id=None, stage=""):
    """``work()``; an outage it meets (cloud.store.outages) sends the task again after a
    backoff, until the outage has lasted ``round_outage_patience_s`` (counted from
    ``outage_since``, carried by the retries): then the round fails with the reason. Any
    other error fails at once (run_stage recorded it)."""
    from celery.exceptions import TaskPredicate

    from cloud.learn.runner import outage_retry_in
    from cloud.store.outages import is_transient

    try:
        return work()
    except TaskPredicate:  # retry, replace: Celery's own control flow
        raise
    except Exception as exc:
        patience = get_settings().round_outage_patience_s
        now = time.time()
        since = outage_since or now
        wait = outage_retry_in(
            exc, retries=task.request.retries or 0, waited_s=now - since, patience_s=patience
        )
        what = f"round {round_id} {stage}".rstrip() if round_id is not None else task.name
        if wait is None:
            if is_transient(exc) and round_id is not None:
                error = (f"outage outlasted round_outage_patience_s ({patience:.0f} s): "
                         f"{type(exc).__name__}: {exc}")  # fmt: skip
                _fail_round(round_id, stage, error)
            raise
        log.warning("%s met an outage (%s: %s); tried again in %.0f s (%.0f s of %.0f s "
                    "patience used)", what, type(exc).__name__, str(exc)[:200], wait,
                    now - since, patience)  # fmt: skip
        kwargs = {**(task.request.kwargs or {}), "outage_since": since}
        raise task.retry(exc=exc, countdown=wait, kwargs=kwargs, max_retries=10_000) from exc


def _fail_round(round_id: int, stage: str, error: str) -> None:
    """Record the round failed (on sessions of their own: the object store the worker's
    services open may be what is down)."""
    from cloud.learn.runner import record_failure
    from cloud.store.db import session_factory

    s = get_settings()
    record_failure(session_factory(s.resolved_database_url, s), round_id, stage, error, 10.0)


def _stage(task, round_id: int, stage: str, outage_since: float | None = None) -> dict:
    """Run ``stage`` of round ``round_id`` holding the fleet's round lock (a copy of the same
    task delivered while the first still runs waits for it, then finds the stage done),
    through outages of the services it uses."""
    return _through_outages(
        task, outage_since, lambda: _run_stage(task, round_id, stage),
        round_id=round_id, stage=stage,
    )  # fmt: skip


def _run_stage(task, round_id: int, stage: str) -> dict:
    from cloud.learn.lock import RoundLock
    from cloud.learn.rounds import finish_if_done, state_of
    from cloud.learn.runner import run_stage
    from cloud.learn.state import STAGES, Services
    from cloud.store.connect import redis_client

    s = get_settings()
    sessions, store, registry = _services()
    st = state_of(sessions, round_id)
    lock = RoundLock(redis_client(s), st.fleet, st.profile, ttl_s=s.round_lock_ttl_s)
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
# chain if its worker dies), waiting for the lock as long as the holder works, and sent
# again after a backoff while an outage lasts (round_outage_patience_s).
STAGE_TASK_OPTIONS = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
}


@app.task(name="edgeloop.round.train", **STAGE_TASK_OPTIONS)
def train_stage(self, round_id: int, outage_since: float | None = None) -> dict:
    """Fine-tune the teacher on new labels + replay (cloud.learn.train)."""
    return _stage(self, round_id, "train", outage_since)


@app.task(name="edgeloop.round.recompress", **STAGE_TASK_OPTIONS)
def recompress_stage(self, round_id: int, outage_since: float | None = None) -> dict:
    """The teacher → the profile's edge package (cloud.learn.recompress)."""
    return _stage(self, round_id, "recompress", outage_since)


@app.task(name="edgeloop.round.evaluate", **STAGE_TASK_OPTIONS)
def evaluate_stage(self, round_id: int, outage_since: float | None = None) -> dict:
    """The package under ONNX Runtime against the gates (cloud.learn.evaluate)."""
    return _stage(self, round_id, "evaluate", outage_since)


@app.task(name="edgeloop.round.register", **STAGE_TASK_OPTIONS)
def register_stage(self, round_id: int, outage_since: float | None = None) -> dict:
    """MLflow run, model version, aliases; the round's answer (cloud.learn.register)."""
    return _stage(self, round_id, "register", outage_since)


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
    from cloud.learn import rounds
    from cloud.learn.lock import RoundLock
    from cloud.store.connect import redis_client

    s = get_settings()
    sessions, _, _ = _services()
    st = rounds.state_of(sessions, round_id)
    lock = RoundLock(redis_client(s), st.fleet, st.profile, ttl_s=s.round_lock_ttl_s)
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
