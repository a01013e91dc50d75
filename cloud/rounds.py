"""A learning round's bookkeeping in the ``rounds`` table: its version reserved before any
work, its settings, and each stage's attempts, progress and output, so a round can be
looked at stage by stage and resumed from the first stage not done.

A stage that is done is never run again: a task delivered twice (its worker died before
acknowledging it) finds the output and hands it on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cloud.db import Round
from cloud.learning import (
    STAGE_FUNCTIONS,
    STAGES,
    RoundConfig,
    RoundState,
    Services,
    next_version,
    summary,
)

log = logging.getLogger(__name__)
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
    return next((r for r in rows if _aware(r.updated_at) > cutoff), None)


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
        version = next_version(sessions=sessions, fleet=fleet, profile=profile)
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
        outputs={k: v["output"] for k, v in stages.items() if v.get("done")},
    )


def _update(sessions: sessionmaker, round_id: int, fn: Callable[[Round, dict], None]) -> None:
    """Apply ``fn(row, stages)`` and write the row; ``stages`` is a fresh copy to change."""
    with sessions() as s:
        row = s.get(Round, round_id)
        assert row is not None, round_id
        stages = {k: dict(v) for k, v in (row.stages or {}).items()}
        fn(row, stages)
        row.stages = stages
        s.commit()


def run_stage(
    svc: Services,
    round_id: int,
    stage: str,
    *,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one stage of a round (or hand on its output if it is done): attempts, progress,
    output, error and seconds recorded in the row. The last stage finishes the round."""
    st = state_of(svc.sessions, round_id)
    if stage in st.outputs:
        if stage == STAGES[-1]:
            finish_if_done(svc.sessions, round_id)  # a crash may have come in between
        return st.outputs[stage]
    missing = [p for p in STAGES[: STAGES.index(stage)] if p not in st.outputs]
    if missing:
        raise RuntimeError(f"round {round_id}: stage {stage} needs {missing} done first")

    def begin(row: Round, stages: dict) -> None:
        info = stages.setdefault(stage, {})
        info["attempts"] = info.get("attempts", 0) + 1
        info["started_at"] = datetime.now(UTC).isoformat()
        info.pop("error", None)
        row.state = stage

    _update(svc.sessions, round_id, begin)
    label = f"{st.fleet}/{st.profile} {st.version} {stage}"

    def progress(message: str) -> None:
        log.info("%s: %s", label, message)
        if say is not None:
            say(message)
        _update(svc.sessions, round_id, lambda _, stages: stages[stage].update(progress=message))

    t0 = time.perf_counter()
    try:
        out = STAGE_FUNCTIONS[stage](svc, st, progress)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]

        def fail(row: Round, stages: dict) -> None:
            stages[stage]["error"] = error
            row.state = "failed"  # the triggers back off; `edgeloop retrain --resume` retries
            row.result = {"error": error, "stage": stage}

        _update(svc.sessions, round_id, fail)
        raise

    def finish(row: Round, stages: dict) -> None:
        stages[stage].update(done=True, output=out, seconds=time.perf_counter() - t0)
        if stage == STAGES[-1]:
            _close(row, stages)  # in the same commit: never done-but-open

    _update(svc.sessions, round_id, finish)
    return out


def _close(row: Round, stages: dict) -> None:
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
            _close(row, stages)
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


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
