"""A Celery learning round's bookkeeping: its version reserved before training, its state,
and recovery when a worker died after registering but before recording."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cloud.db import ModelVersion, Round
from cloud.learning import next_version
from cloud.registry import Registry, model_name


def reserve(
    *, sessions: sessionmaker, task_id: str, fleet: str, profile: str, reason: str
) -> Round:
    """The round row for ``task_id``: found again on redelivery (attempts + 1), or new with
    the next version. Call it holding the fleet's round lock: a reservation left by a
    round that died for good (its task lost) is taken over, so versions stay dense."""
    with sessions() as s:
        row = s.scalar(select(Round).where(Round.task_id == task_id))
        if row is not None:
            row.attempts += 1
            s.commit()
            return row
        version = next_version(sessions=sessions, fleet=fleet, profile=profile)
        row = s.scalar(
            select(Round).where(
                Round.fleet == fleet, Round.profile == profile, Round.version == version
            )
        )
        if row is not None and row.state != "done":
            row.task_id, row.state, row.reason, row.attempts = task_id, "training", reason, 1
        else:
            row = Round(
                task_id=task_id, fleet=fleet, profile=profile, version=version, reason=reason
            )
            s.add(row)
        s.commit()
        return row


def set_state(
    sessions: sessionmaker, task_id: str, state: str, result: dict[str, Any] | None = None
) -> None:
    with sessions() as s:
        row = s.scalar(select(Round).where(Round.task_id == task_id))
        assert row is not None, task_id
        row.state = state
        if result is not None:
            row.result = result
        s.commit()


def recover_registered(
    *, sessions: sessionmaker, registry: Registry, row: Round
) -> dict[str, Any] | None:
    """A round that died between registering its package in MLflow and recording it here:
    record it from the registry's tags (the package is already in the store), instead of
    training again and registering a second version. None: nothing was registered."""
    found = registry.find_version(row.fleet, row.profile, row.version)
    if found is None:
        return None
    mlflow_version, tags = found
    gates = json.loads(tags.get("gates", "{}"))
    name = model_name(row.fleet, row.profile)
    with sessions() as s:
        exists = s.scalar(
            select(ModelVersion).where(
                ModelVersion.name == name, ModelVersion.version == row.version
            )
        )
        if exists is None:
            s.add(
                ModelVersion(
                    name=name,
                    version=row.version,
                    mlflow_version=mlflow_version,
                    profile=row.profile,
                    sha256=tags["sha256"],
                    parent=tags.get("parent") or None,
                    object_key=f"packages/{row.fleet}/{row.profile}/{row.version}.edgepkg",
                    class_names=json.loads(tags.get("classes", "[]")),
                    gates=gates,
                )
            )
            s.commit()
    return {
        "version": row.version,
        "parent": tags.get("parent") or None,
        "mlflow_version": mlflow_version,
        "gates": gates,
        "promoted": bool(gates.get("passed")),
        "recovered": True,
    }
