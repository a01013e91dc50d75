"""Who moved a champion alias, as recorded with the rollout the move started.

MLflow's ``model_version_alias.created`` event names the model, alias and version, never the
user (MLflow 3.17). Our promote command (and a round that passes its gates) tags the version
with its mover and the time before moving the alias; a rollout credits that mover only if
the tags are newer than the profile's previous rollout, so a later move to the same version
made without our command (the MLflow UI) is recorded as unknown, never as the old mover."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from cloud.store.db import aware

log = logging.getLogger(__name__)

UNKNOWN_MOVER = "unknown: moved in MLflow (its alias events name no user)"
# The (who, when) our promote command tagged a version with (cloud.tracking).
Mover = tuple[str, float]
# (fleet, profile, MLflow version) → the version's Mover, read from the registry
MoverOf = Callable[[str, str, str], Mover | None]


def moved_by(mover: Mover | None, previous: datetime | None, trigger: str = "alias") -> str | None:
    """Who moved the alias to a version: the mover its tags name, if they were set after
    the ``previous`` rollout of its profile began; an older tag is from an earlier move to
    the same version, and this one was made without our command (the MLflow UI). None for
    a rollout no move started (devices enrolled since the champion went out)."""
    if trigger == "enrolled":
        return None
    if mover is None:
        return UNKNOWN_MOVER
    who, at = mover
    if previous is not None and at <= aware(previous).timestamp():
        return UNKNOWN_MOVER
    return who


def read_mover(
    mover_of: MoverOf | None, fleet: str, profile: str, mlflow_version: str, trigger: str
) -> Mover | None:
    """The version's moved-by tags for a reconcile's rollout; None for another trigger, or
    when the registry cannot be read (the mover is then unknown; the rollout still starts)."""
    if mover_of is None or trigger != "reconcile":
        return None
    try:
        return mover_of(fleet, profile, mlflow_version)
    except Exception as exc:  # noqa: BLE001 - any registry failure: the mover unknown
        log.warning("mover of %s/%s %s not read: %s", fleet, profile, mlflow_version, exc)
        return None
