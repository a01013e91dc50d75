"""What one rollout runs with (its settings, a fleet's overrides checked and typed), the
fleet row lock every signing step takes, and a profile's budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.compress.profiles import get_profile
from cloud.config import CloudSettings
from cloud.rollout.health import Budget, Thresholds
from cloud.rollout.waves import WavePolicy
from cloud.store.db import Fleet
from shared.errors import ConfigError


@dataclass(frozen=True)
class RolloutSettings:
    """What one rollout runs with: cloud settings ``rollout_*``, then the fleet row's
    overrides of the same names; fixed in the rollout's params when it starts."""

    canary_min_devices: int = 5
    canary_share: float = 0.05
    wave_growth: float = 2.0
    dwell_heartbeats: int = 3
    alpha: float = 0.01
    min_effect: float = 0.05
    max_accuracy_drop_pts: float = 5.0
    min_labels: int = 30
    wave_timeout_s: float = 1800.0
    resend_s: float = 60.0
    presigned_urls: bool = False

    @classmethod
    def resolve(cls, settings: CloudSettings, overrides: dict[str, Any]) -> RolloutSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(
            k for k in overrides if k.startswith("rollout_") and k[len("rollout_") :] not in names
        )
        if unknown:
            raise ConfigError(f"fleet settings name unknown rollout settings {unknown}")
        values = {n: getattr(settings, f"rollout_{n}") for n in names}
        for f in fields(cls):
            key = f"rollout_{f.name}"
            if key in overrides:
                values[f.name] = _coerce(key, overrides[key], type(f.default))
        out = cls(**values)
        out.waves.check()
        return out

    @property
    def waves(self) -> WavePolicy:
        return WavePolicy(self.canary_min_devices, self.canary_share, self.wave_growth)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.alpha, self.min_effect, self.max_accuracy_drop_pts, self.min_labels)


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def _coerce(key: str, value: Any, kind: type) -> Any:
    """A fleet's override as the setting's type (numbers and booleans may be written as
    strings, as environment variables are); else a ConfigError naming it: an unchecked "5"
    would break every step's comparisons."""
    if kind is bool:
        out = value if isinstance(value, bool) else _BOOLS.get(str(value).strip().lower())
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        ok = math.isfinite(number) and (kind is float or number.is_integer())
        out = kind(number) if ok else None
    else:
        out = None
    if out is None:
        raise ConfigError(f"fleet setting {key} = {value!r} is not a valid {kind.__name__}")
    return out


def lock_fleet(session: Session, fleet: str) -> Fleet:
    """The fleet's row, locked until the transaction ends (created if the fleet has none):
    releases of one fleet are signed one at a time."""
    row = session.scalar(select(Fleet).where(Fleet.id == fleet).with_for_update())
    if row is None:
        try:
            with session.begin_nested():
                session.add(Fleet(id=fleet))
        except IntegrityError:
            pass  # created meanwhile by another worker
        row = session.scalar(select(Fleet).where(Fleet.id == fleet).with_for_update())
    assert row is not None
    return row


def budget_of(profile: str) -> Budget:
    """The profile's latency and memory budgets; none for a profile profiles.toml lacks."""
    try:
        p = get_profile(profile)
    except ConfigError:
        return Budget()
    return Budget(max_latency_ms=p.max_latency_ms, max_memory_mb=p.max_memory_mb)
