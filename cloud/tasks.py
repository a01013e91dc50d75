"""Celery app and its thin tasks: ids in, state re-fetched, plain functions do the work."""

from __future__ import annotations

import logging
from dataclasses import asdict

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


@app.task(name="edgeloop.retrain", bind=True)
def retrain(self, fleet: str, profile: str = "cpu-fp32") -> dict:  # type: ignore[no-untyped-def]
    """One retraining round for ``fleet`` / ``profile``; returns the new version and gates."""
    from cloud.learning import RoundConfig, run_round

    sessions, store, registry = _services()
    result = run_round(
        sessions=sessions,
        store=store,
        registry=registry(fleet),
        cfg=RoundConfig(fleet=fleet, profile=profile),
    )
    out = asdict(result)
    out.pop("package")
    return out
