"""The retention policy of one fleet: the cloud's ``retention_*`` settings, then the fleet
row's overrides of the same names."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from cloud.config import CloudSettings
from shared.errors import ConfigError


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages in days (0: kept forever); ``versions_keep`` newest versions per profile kept
    besides the protected ones; ``batch`` rows per delete transaction."""

    samples_days: float = 365.0
    unlabelled_days: float = 30.0
    dead_letters_days: float = 30.0
    deltas_days: float = 30.0
    versions_keep: int = 5
    mlflow_runs_days: float = 180.0
    batch: int = 500

    @classmethod
    def resolve(cls, settings: CloudSettings, overrides: dict[str, Any]) -> RetentionPolicy:
        names = {f.name for f in fields(cls)}
        unknown = sorted(
            k
            for k in overrides
            if k.startswith("retention_") and k[len("retention_") :] not in names
        )
        if unknown:
            raise ConfigError(
                f"fleet settings name unknown retention settings {unknown}; the settings are "
                f"{sorted('retention_' + n for n in names)}"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"retention_{f.name}"
            values[f.name] = _number(key, overrides.get(key, getattr(settings, key)), f.type)
        return cls(**values)

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ConfigError(f"retention_{f.name} = {getattr(self, f.name)} is negative")
        if self.versions_keep < 1:
            raise ConfigError(
                "retention_versions_keep must be at least 1: the newest version of a profile "
                "is what the next round and rollout start from"
            )
        if self.batch < 1:
            raise ConfigError("retention_batch must be at least 1")

    @staticmethod
    def cutoff(now: datetime, days: float) -> datetime | None:
        """What is older than this expires (None: ``days`` 0, nothing does)."""
        return None if days == 0 else now - timedelta(days=days)


def _number(key: str, value: Any, kind: Any) -> float | int:
    """``value`` as the setting's type (an override may be written as a string, as
    environment variables are); else a ConfigError naming it."""
    whole = kind in (int, "int")
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (whole and not number.is_integer()):
        raise ConfigError(
            f"fleet setting {key} = {value!r} is not a valid {'integer' if whole else 'number'}"
        )
    return int(number) if whole else number
