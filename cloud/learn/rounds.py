"""A learning round's bookkeeping in the ``rounds`` table: its version reserved before any
work, its settings, and each stage's attempts, progress and output, so a round can be
looked at stage by stage and resumed from the first stage not done (cloud.learn.runner
runs the stages). Free of torch: the CLI reads rounds through it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cloud.learn.state import STAGES, RoundConfig, RoundState, StageOutputs, summary
from cloud.store.db import Round, aware
from cloud.store.records import next_version
from shared.package import model_name

FINISHED = ("done", "failed")
MAX_REGISTER_ATTEMPTS = 3  # a round failing to register this often is trained afresh


def active_round(
    sessions: sessionmaker, fleet: str, profile: str, *, stale_after_s: float
) -> Round | None:
    """The round of ``fleet``/``profile`` still under way, if any. A round that has not
    written anything for ``stale_after_s`` is taken for dead (its chain lost): not active."""
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    with sessions() as s:
        rows = s.scalars(
            select(Round)
            .where(Round.fleet == fleet, Round.profile == profile, Round.state.not_in(FINISHED))
            .order_by(Round.id.desc())
        ).all()
    return next((r for r in rows if aware(r.updated_at) > cutoff), None)


def reserve(
    *,
    sessions: sessionmaker,
    task_id: str,
    fleet: str,
    profile: str,
    reason: str,
    config: dict[str, Any],
) -> Round:
    """The round row for ``task_id``: found again on redelivery (attempts + 1), or new with
    the next version. Call it holding the fleet's round lock. A reservation of that version
    left by a dead round is taken over: a failed one starts afresh (unless it failed while
    registering), one whose chain was lost keeps the stages it finished (so it resumes)."""
    with sessions() as s:
        row = s.scalar(select(Round).where(Round.task_id == task_id))
        if row is not None:
            row.attempts += 1
            s.commit()
            return row
        version = next_version(sessions, model_name(fleet, profile))
        row = s.scalar(
            select(Round).where(
                Round.fleet == fleet, Round.profile == profile, Round.version == version
            )
        )
        if row is not None and row.state == "done":
            raise RuntimeError(
                f"round {row.id} recorded {fleet}/{profile} {version} as done, but the model "
                "versions table does not have it: restore that table before the next round"
            )
        fresh = row is None
        if row is None:
            row = Round(task_id=task_id, fleet=fleet, profile=profile, version=version)
            s.add(row)
        elif row.state == "failed":
            register = (row.stages or {}).get("register", {})
            # A round that failed while registering resumes instead (MLflow may already
            # hold its package under this version, and a retrained one would not match
            # it), unless registering failed again and again: then it starts afresh.
            fresh = not register or register.get("attempts", 0) >= MAX_REGISTER_ATTEMPTS
        if fresh:
            row.stages, row.config = {}, config  # on the labels and settings there are now
        # else: resumed with the settings its finished stages ran with
        row.task_id, row.reason, row.attempts = task_id, reason, 1
        row.state = first_left(row) or STAGES[-1]
        s.commit()
        return row


def first_left(row: Round) -> str | None:
    """The first stage of ``row`` not done (None: all are)."""
    stages = row.stages or {}
    return next((st for st in STAGES if not stages.get(st, {}).get("done")), None)


def state_of(sessions: sessionmaker, round_id: int) -> RoundState:
    with sessions() as s:
        row = s.get(Round, round_id)
        if row is None:
            raise LookupError(f"no round {round_id}")
        return _state(row, row.stages or {})


def _state(row: Round, stages: dict) -> RoundState:
    return RoundState(
        id=row.id,
        fleet=row.fleet,
        profile=row.profile,
        version=row.version,
        initial=row.reason == "initial",
        cfg=RoundConfig.from_dict(row.config or {"fleet": row.fleet, "profile": row.profile}),
        outputs=_outputs(stages),
    )


def _outputs(stages: dict[str, Any]) -> StageOutputs:
    """The outputs of the stages that are done (JSON as the row keeps it)."""
    done: Any = {k: v["output"] for k, v in stages.items() if v.get("done")}
    return done  # the keys are STAGES and each output was written by its stage


def update(sessions: sessionmaker, round_id: int, fn: Callable[[Round, dict], None]) -> None:
    """Apply ``fn(row, stages)`` and write the row; ``stages`` is a fresh copy to change."""
    with sessions() as s:
        row = s.get(Round, round_id)
        assert row is not None, round_id
        stages = {k: dict(v) for k, v in (row.stages or {}).items()}
        fn(row, stages)
        row.stages = stages
        s.commit()


def close(row: Round, stages: dict) -> None:
    row.state = "done"
    row.result = {
        **summary(_state(row, stages)),
        "reason": row.reason,
        "attempts": {k: v.get("attempts", 0) for k, v in stages.items()},
        "seconds": sum(v.get("seconds", 0.0) for v in stages.values()),
    }


def finish_if_done(sessions: sessionmaker, round_id: int) -> dict[str, Any]:
    """The round's answer once every stage is done (closing it if that was not recorded)."""
    with sessions() as s:
        row = s.get(Round, round_id)
        if row is None:
            raise LookupError(f"no round {round_id}")
        if row.state != "done":
            if first_left(row) is not None:
                raise RuntimeError(f"round {round_id} has stages left: {first_left(row)}")
            stages = {k: dict(v) for k, v in (row.stages or {}).items()}
            close(row, stages)
            s.commit()
        assert row.result is not None
        return row.result


def resume(sessions: sessionmaker, round_id: int) -> list[str]:
    """Make a failed or stalled round runnable again; the stages it has left."""
    with sessions() as s:
        row = s.get(Round, round_id)
        if row is None:
            raise LookupError(f"no round {round_id}")
        left = first_left(row)
        if left is None:
            return []
        row.state = left
        row.result = None
        s.commit()
        return list(STAGES[STAGES.index(left) :])


def recent(sessions: sessionmaker, *, fleet: str | None = None, last: int = 20) -> list[Round]:
    """The newest ``last`` rounds (of ``fleet``, or of all), newest first."""
    query = select(Round).order_by(Round.id.desc()).limit(last)
    if fleet is not None:
        query = query.where(Round.fleet == fleet)
    with sessions() as s:
        return list(s.scalars(query))


def where(
    sessions: sessionmaker, *, round_id: int | None = None, task_id: str | None = None
) -> str:
    """One line on where a round stands (by id, or by the task that started it): its
    stage and that stage's last progress line; ``queued`` before a worker took it."""
    with sessions() as s:
        row = (
            s.get(Round, round_id)
            if round_id is not None
            else s.scalar(select(Round).where(Round.task_id == task_id))
        )
        if row is None or (round_id is not None and row.state == "failed"):
            return "queued"  # not yet picked up by a worker
        info = (row.stages or {}).get(row.state, {})
        return f"round {row.id} {row.version}: {row.state} {info.get('progress', '')}".rstrip()
