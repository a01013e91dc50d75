"""What ingest needs to know of a fleet, cached: its devices' upload budgets and the window
its models take.

The window shape and dtype come from the fleet's newest model version that passed its
gates: the input spec in that package's manifest, which is what every device of the fleet
runs windows through. A fleet row's ``settings`` may name it instead (``"window": [T, C]``),
and name the budgets (``upload_bytes_per_hour``, ``upload_messages_per_hour``); what it
does not name falls back to IngestLimits. A fleet with no model yet takes any shape.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.ingest.limits import IngestLimits
from cloud.store.db import Fleet, ModelVersion
from cloud.store.objects import ObjectNotFound, ObjectStore
from shared.errors import PackageError
from shared.package import ModelPackage, model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetRules:
    window: tuple[int, int] | None  # (T, C) every window must have; None: any
    dtype: str | None
    bytes_per_hour: float
    messages_per_hour: float


class FleetRulesCache:
    """FleetRules per fleet, read at most every ``limits.fleet_cache_s``."""

    def __init__(self, *, store: ObjectStore, limits: IngestLimits) -> None:
        self.store, self.limits = store, limits
        self._cache: dict[str, tuple[float, FleetRules]] = {}

    def get(self, session: Session, fleet: str) -> FleetRules:
        hit = self._cache.get(fleet)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        rules = self._read(session, fleet)
        self._cache[fleet] = (now + self.limits.fleet_cache_s, rules)
        return rules

    def _read(self, session: Session, fleet: str) -> FleetRules:
        row = session.get(Fleet, fleet)
        settings = dict(row.settings or {}) if row is not None else {}
        window, dtype = _window_setting(settings.get("window")), None
        if window is None:
            window, dtype = self._model_input(session, fleet)
        return FleetRules(
            window=window,
            dtype=dtype,
            bytes_per_hour=_positive(
                settings.get("upload_bytes_per_hour"), self.limits.upload_bytes_per_hour
            ),
            messages_per_hour=_positive(
                settings.get("upload_messages_per_hour"), self.limits.upload_messages_per_hour
            ),
        )

    def _model_input(
        self, session: Session, fleet: str
    ) -> tuple[tuple[int, int] | None, str | None]:
        rows = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name.startswith(f"edgeloop.{fleet}.", autoescape=True))
            .order_by(ModelVersion.id.desc())
        )
        for mv in rows:
            if mv.name != model_name(fleet, mv.profile) or not (mv.gates or {}).get("passed"):
                continue
            try:
                spec = ModelPackage(self.store.get(mv.object_key)).manifest.input
            except (ObjectNotFound, PackageError) as exc:
                log.warning("fleet %s: cannot read %s %s's input spec: %s", fleet, mv.name,
                            mv.version, exc)  # fmt: skip
                continue
            return (spec.window, spec.channels), spec.dtype
        return None, None


def _window_setting(value: object) -> tuple[int, int] | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _positive(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if value is not None:
        log.warning("fleet setting %r is not a positive number; using %s", value, default)
    return float(default)
