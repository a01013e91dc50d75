"""The daily garbage collection (beat: ``retention_gc_hour_utc``): thin, the work is
cloud.retention's; one at a time across workers (the gc lock), a second copy skips."""

from __future__ import annotations

import logging
from typing import Any

from cloud.config import get_settings
from cloud.tasks import _services, app

log = logging.getLogger(__name__)


@app.task(name="edgeloop.gc")
def gc(fleet: str | None = None) -> dict[str, Any]:
    """Collect ``fleet`` (None: every fleet) by the retention policy; what went, per fleet
    and kind, or ``{"skipped": why}`` when another collection holds the lock."""
    from cloud.retention.run import GcRunning, run_gc
    from cloud.tracking.retention import open_retention_tracker

    sessions, store, _ = _services()
    settings = get_settings()
    try:
        done = run_gc(
            settings=settings,
            sessions=sessions,
            store=store,
            tracker=open_retention_tracker(settings),
            fleet=fleet,
        )
    except GcRunning as exc:
        log.info("gc skipped: %s", exc)
        return {"skipped": str(exc)}
    return {
        plan.fleet or "": {"deleted": swept.deleted, "bytes": swept.bytes, "notes": swept.notes}
        for plan, swept in done
        if swept is not None
    }
