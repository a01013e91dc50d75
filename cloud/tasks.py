"""Celery app and its thin tasks: ids in, state re-fetched, plain functions do the work."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime

from celery import Celery

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
        }
    },
)


def _policy():  # type: ignore[no-untyped-def]
    from cloud.triggers import TriggerPolicy

    s = get_settings()
    return TriggerPolicy(
        min_new_labels=s.trigger_min_new_labels,
        anomaly_rate_jump=s.trigger_anomaly_rate_jump,
        max_age_h=s.trigger_max_age_h,
    )


def _services():  # type: ignore[no-untyped-def]
    from cloud.db import session_factory
    from cloud.registry import Registry
    from cloud.storage import open_store

    s = get_settings()
    return (
        session_factory(s.resolved_database_url),
        open_store(s),
        lambda fleet: Registry(
            s.resolved_mlflow_uri,
            experiment=f"edgeloop-{fleet}",
            artifact_location=s.mlflow_artifact_location,
        ),
    )


# acks_late: the message stays in Redis until the round is recorded, so a round whose
# worker was killed is delivered again (after the broker's visibility timeout) and
# finishes under the version it reserved; the rounds table makes that idempotent.
@app.task(name="edgeloop.retrain", bind=True, acks_late=True, reject_on_worker_lost=True)
def retrain(self, fleet: str, profile: str = "cpu-fp32", reason: str = "manual") -> dict:  # type: ignore[no-untyped-def]
    """One retraining round for ``fleet`` / ``profile``; returns the new version and gates.

    At most one round per fleet and profile runs (a Redis lock). A round a trigger asked
    for checks under the lock that it is still due, so two triggers that fire together,
    or one that fires again while a round runs, give one round. Its version is reserved
    (the rounds table) before training, so a delivery after a worker died finishes the
    same round under the same version instead of starting another."""
    import redis
    from sqlalchemy import select

    from cloud import rounds
    from cloud.db import Round
    from cloud.learning import RoundConfig, run_round
    from cloud.triggers import RoundLock, check

    task_id = self.request.id or "eager"
    s = get_settings()
    sessions, store, registry = _services()
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
        if known is None and reason != "manual":
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
            sessions=sessions, task_id=task_id, fleet=fleet, profile=profile, reason=reason
        )
        log.info(
            "round %s for %s/%s (attempt %d) starts: %s",
            row.version, fleet, profile, row.attempts, reason,
        )  # fmt: skip
        out = None
        if row.state == "registering":
            out = rounds.recover_registered(sessions=sessions, registry=registry(fleet), row=row)
        if out is None:
            try:
                result = run_round(
                    sessions=sessions,
                    store=store,
                    registry=registry(fleet),
                    cfg=RoundConfig(fleet=fleet, profile=profile),
                    version=row.version,
                    on_stage=lambda stage: rounds.set_state(sessions, task_id, stage),
                )
            except Exception as exc:
                # Recorded, so the triggers back off instead of retrying every beat.
                rounds.set_state(sessions, task_id, "failed", {"error": repr(exc)[:2000]})
                raise
            out = asdict(result)
            out.pop("package")
        out["reason"] = reason
        out["attempts"] = row.attempts
        rounds.set_state(sessions, task_id, "done", out)
    finally:
        lock.release()
    return out


@app.task(name="edgeloop.check_triggers")
def check_triggers() -> list[dict]:
    """Beat's task: start a round for every fleet and profile whose policy fires."""
    from cloud.triggers import due_rounds

    sessions, _, _ = _services()
    with sessions() as session:
        due = due_rounds(session=session, policy=_policy())
    for d in due:
        log.info("trigger for %s/%s: %s", d.fleet, d.profile, "; ".join(d.reasons))
        retrain.delay(d.fleet, d.profile, reason="; ".join(d.reasons))
    return [asdict(d) for d in due]
