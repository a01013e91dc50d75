"""Celery app (``celery -A cloud.tasks``) and what its thin tasks share; the tasks live in
``rounds`` (learning rounds, triggers), ``rollouts`` (rollouts, timestamps) and
``retention`` (the daily garbage collection): ids in, state re-fetched, plain functions do
the work."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_init

from cloud.config import get_settings
from cloud.store.connect import broker_transport_options, celery_connection

log = logging.getLogger(__name__)

settings = get_settings()
app: Celery = Celery("edgeloop")
app.conf.update(
    # Broker and result backend: the settings' Redis URL, credentials, TLS and timeouts.
    **celery_connection(settings),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    result_expires=7 * 24 * 3600,
    task_default_queue=settings.celery_queue,
    broker_transport_options=broker_transport_options(settings),
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
        # Retention (docs/retention.md): once a day; a copy finding the gc lock held skips.
        "edgeloop-gc": {
            "task": "edgeloop.gc",
            "schedule": crontab(hour=settings.retention_gc_hour_utc, minute=17),
            "options": {"expires": 3600},
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


@lru_cache(maxsize=1)
def _services():
    """Sessions, object store and a registry per fleet: opened once per worker process."""
    from cloud.store.db import session_factory
    from cloud.store.objects import open_store
    from cloud.tracking.registry import open_registry

    s = get_settings()
    return (
        session_factory(s.resolved_database_url, s),
        open_store(s),
        lambda fleet: open_registry(s, fleet),
    )


# The task modules register their tasks on ``app``; imported last, as they import it.
from cloud.tasks.retention import gc  # noqa: E402
from cloud.tasks.rollouts import (  # noqa: E402
    _signer,
    _tracker,
    _transport,
    advance_rollout,
    refresh_timestamps,
    rollout_on_alias,
    rollout_reconcile,
    rollout_tick,
)
from cloud.tasks.rounds import (  # noqa: E402
    STAGE_TASKS,
    check_triggers,
    resume_round,
    retrain,
    round_chain,
    round_config,
)

__all__ = [
    "STAGE_TASKS",
    "_services",
    "_signer",
    "_tracker",
    "_transport",
    "advance_rollout",
    "app",
    "check_triggers",
    "gc",
    "refresh_timestamps",
    "resume_round",
    "retrain",
    "rollout_on_alias",
    "rollout_reconcile",
    "rollout_tick",
    "round_chain",
    "round_config",
]
