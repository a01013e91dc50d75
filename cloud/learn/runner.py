"""Running a round's stages: one at a time, recorded in the round's row (a Celery task per
stage, cloud.tasks), or all of them in this process (the demo, which has no worker).

A stage that is done is never run again: a task delivered twice (its worker died before
acknowledging it) finds the output and hands it on.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import sessionmaker

from cloud.learn import rounds
from cloud.learn.evaluate import stage_evaluate
from cloud.learn.recompress import stage_recompress
from cloud.learn.register import stage_register
from cloud.learn.state import STAGES, RoundConfig, RoundResult, RoundState, Services, summary
from cloud.learn.train import stage_train
from cloud.store.db import Round
from cloud.store.objects import ObjectStore
from cloud.tracking.registry import Registry

log = logging.getLogger(__name__)

Stage = Callable[[Services, RoundState, Callable[[str], None]], Any]
STAGE_FUNCTIONS: dict[str, Stage] = {
    "train": stage_train,
    "recompress": stage_recompress,
    "evaluate": stage_evaluate,
    "register": stage_register,
}


def run_stage(
    svc: Services,
    round_id: int,
    stage: str,
    *,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one stage of a round (or hand on its output if it is done): attempts, progress,
    output, error and seconds recorded in the row. The last stage finishes the round."""
    st = rounds.state_of(svc.sessions, round_id)
    if stage in st.outputs:
        if stage == STAGES[-1]:
            rounds.finish_if_done(svc.sessions, round_id)  # a crash may have come in between
        done: dict[str, Any] = dict(st.outputs)
        return done[stage]
    missing = [p for p in STAGES[: STAGES.index(stage)] if p not in st.outputs]
    if missing:
        raise RuntimeError(f"round {round_id}: stage {stage} needs {missing} done first")

    def begin(row: Round, stages: dict) -> None:
        info = stages.setdefault(stage, {})
        info["attempts"] = info.get("attempts", 0) + 1
        info["started_at"] = datetime.now(UTC).isoformat()
        info.pop("error", None)
        row.state = stage

    rounds.update(svc.sessions, round_id, begin)
    label = f"{st.fleet}/{st.profile} {st.version} {stage}"

    def progress(message: str) -> None:
        log.info("%s: %s", label, message)
        if say is not None:
            say(message)
        rounds.update(
            svc.sessions, round_id, lambda _, stages: stages[stage].update(progress=message)
        )

    t0 = time.perf_counter()
    try:
        out = STAGE_FUNCTIONS[stage](svc, st, progress)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]

        def fail(row: Round, stages: dict) -> None:
            stages[stage]["error"] = error
            row.state = "failed"  # the triggers back off; `edgeloop retrain --resume` retries
            row.result = {"error": error, "stage": stage}

        rounds.update(svc.sessions, round_id, fail)
        raise

    def finish(row: Round, stages: dict) -> None:
        stages[stage].update(done=True, output=out, seconds=time.perf_counter() - t0)
        if stage == STAGES[-1]:
            rounds.close(row, stages)  # in the same commit: never done-but-open

    rounds.update(svc.sessions, round_id, finish)
    return out


def run_round(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    cfg: RoundConfig,
    progress: Callable[[str], None] | None = None,
    initial: bool = False,
) -> RoundResult:
    """One round with every stage in this process (the demo, which has no Celery worker):
    the same stages and bookkeeping as the Celery chain. ``initial``: round 0, a model for
    the base data set's classes (train_initial)."""
    t0 = time.perf_counter()
    svc = Services(sessions, store, registry)
    row = rounds.reserve(
        sessions=sessions,
        task_id=f"local-{uuid.uuid4()}",
        fleet=cfg.fleet,
        profile=cfg.profile,
        reason="initial" if initial else "manual (in process)",
        config=cfg.to_dict(),
    )
    for stage in STAGES:
        run_stage(svc, row.id, stage, say=progress)
    st = rounds.state_of(sessions, row.id)
    out = summary(st)
    return RoundResult(
        version=out["version"],
        parent=out["parent"],
        class_names=out["class_names"],
        new_classes=out["new_classes"],
        samples_used=out["samples_used"],
        gates=out["gates"],
        promoted=out["promoted"],
        package=store.get(out["package_key"]),
        mlflow_version=out["mlflow_version"],
        seconds=time.perf_counter() - t0,
    )


def train_initial(**kwargs: Any) -> RoundResult:
    """Round 0: a model for the base data set's classes, registered as champion (the
    arguments of run_round)."""
    return run_round(**kwargs, initial=True)
