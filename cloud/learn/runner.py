"""Running a round's stages: one at a time, recorded in the round's row (a Celery task per
stage, cloud.tasks), or all of them in this process (the demo, which has no worker).

A stage that is done is never run again: a task delivered twice (its worker died before
acknowledging it) finds the output and hands it on. Outages (cloud.store.outages) do not
fail a round: a progress line that cannot be written is skipped (the next one is written),
a stage's output waits for the database up to ``round_outage_patience_s``, and a stage
that meets one raises it unrecorded, for its task to try the stage again after a backoff.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import sessionmaker

from cloud.config import get_settings
from cloud.learn import rounds
from cloud.learn.evaluate import stage_evaluate
from cloud.learn.recompress import stage_recompress
from cloud.learn.register import stage_register
from cloud.learn.state import STAGES, RoundConfig, RoundResult, RoundState, Services, summary
from cloud.learn.train import stage_train
from cloud.store.db import Round
from cloud.store.objects import ObjectStore
from cloud.store.outages import is_transient
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
    patience_s: float | None = None,
) -> dict[str, Any]:
    """Run one stage of a round (or hand on its output if it is done): attempts, progress,
    output, error and seconds recorded in the row. The last stage finishes the round.

    An outage the stage meets is raised without failing the round (the caller tries again);
    the stage's output and a failure's reason wait up to ``patience_s`` (default: the
    setting ``round_outage_patience_s``) for the database to take them."""
    patience = get_settings().round_outage_patience_s if patience_s is None else patience_s
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
        note(svc, round_id, stage, message)

    t0 = time.perf_counter()
    try:
        out = STAGE_FUNCTIONS[stage](svc, st, progress)
    except Exception as exc:
        if is_transient(exc):
            note(svc, round_id, stage, f"waiting out an outage: {type(exc).__name__}: {exc}")
            raise
        record_failure(svc.sessions, round_id, stage, f"{type(exc).__name__}: {exc}", patience)
        raise

    def finish(row: Round, stages: dict) -> None:
        stages[stage].update(done=True, output=out, seconds=time.perf_counter() - t0)
        if stage == STAGES[-1]:
            rounds.close(row, stages)  # in the same commit: never done-but-open

    # The output may have taken minutes: it waits for the database rather than be lost.
    patiently(lambda: rounds.update(svc.sessions, round_id, finish), patience, label)
    return out


def note(svc: Services, round_id: int, stage: str, message: str) -> None:
    """Write ``message`` as the stage's progress line; in an outage, skip it (logged): a
    line not written is not worth failing minutes of training for, and the next one is."""
    try:
        rounds.update(
            svc.sessions, round_id, lambda _, stages: stages[stage].update(progress=message)
        )
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("round %d %s: progress not written (%s); the next line will be",
                    round_id, stage, type(exc).__name__)  # fmt: skip


def record_failure(
    sessions: sessionmaker, round_id: int, stage: str, error: str, patience_s: float
) -> None:
    """The round failed at ``stage`` with ``error``, recorded (waiting out an outage of
    the database up to ``patience_s``; past it, only logged)."""
    error = error[:2000]

    def fail(row: Round, stages: dict) -> None:
        stages.setdefault(stage, {})["error"] = error
        row.state = "failed"  # the triggers back off; `edgeloop retrain --resume` retries
        row.result = {"error": error, "stage": stage}

    try:
        patiently(lambda: rounds.update(sessions, round_id, fail), patience_s, stage)
    except Exception as exc:
        log.error("round %d failed at %s (%s) and that could not be recorded: %s",
                  round_id, stage, error, exc)  # fmt: skip


def patiently(write: Callable[[], None], patience_s: float, what: str) -> None:
    """``write()``, tried again with backoff while it meets an outage, for ``patience_s``."""
    deadline = time.monotonic() + patience_s
    for attempt in itertools.count():
        try:
            write()
            return
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            wait = min(0.5 * 2**attempt, 15.0, left)
            log.warning("%s: not written (%s); again in %.1f s", what, type(exc).__name__, wait)
            time.sleep(wait)


def outage_retry_in(
    exc: BaseException, *, retries: int, waited_s: float, patience_s: float
) -> float | None:
    """Seconds before a stage that raised ``exc`` is tried again (backoff: 1, 2, 4 … 30 s),
    or None: fail the round now (not an outage, or one that has lasted ``patience_s``)."""
    if not is_transient(exc) or waited_s >= patience_s:
        return None
    return max(1.0, min(2.0 ** min(retries, 5), 30.0, patience_s - waited_s))


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
