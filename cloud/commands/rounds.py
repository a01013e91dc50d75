"""Learning rounds from the command line: the Celery worker and beat, `edgeloop retrain`
(start or resume one and follow it) and `edgeloop cloud rounds`."""

from __future__ import annotations

import typer

from cloud.commands.common import sessions as _sessions


def worker(
    concurrency: int = typer.Option(1, min=1, help="Rounds run in parallel on this host."),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run a Celery worker for learning rounds (broker: EDGELOOP_REDIS_URL)."""
    import os
    import sys

    os.execvp(
        sys.executable,
        [sys.executable, "-m", "celery", "-A", "cloud.tasks", "worker",
         "--concurrency", str(concurrency), "--loglevel", loglevel],
    )  # fmt: skip


def beat(loglevel: str = typer.Option("INFO")) -> None:
    """Run Celery beat: every EDGELOOP_TRIGGER_INTERVAL_S it checks each fleet's trigger
    policy (new labels, anomaly-rate drift, schedule) and starts the rounds that are due."""
    import os
    import sys

    from cloud.config import get_settings

    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    os.execvp(
        sys.executable,
        [sys.executable, "-m", "celery", "-A", "cloud.tasks", "beat", "--loglevel", loglevel,
         "--schedule", str(home / "celerybeat-schedule")],
    )  # fmt: skip


def retrain(
    fleet: str | None = typer.Option(None, help="The fleet whose model to retrain."),
    profile: str = typer.Option("cpu-fp32", help="The hardware profile's model."),
    resume: int | None = typer.Option(
        None,
        help="Instead of a new round, run round N again from its first stage not done "
        "(see `edgeloop cloud rounds`).",
    ),
    timeout: float = typer.Option(3600, help="Seconds to wait for the round."),
) -> None:
    """Start a learning round by hand on the Celery workers and follow it stage by stage
    (train → recompress → evaluate → register) to the end. One round per fleet and profile
    runs at a time: if one is running, this says so."""
    import time

    import redis
    from celery.exceptions import TimeoutError as CeleryTimeout

    from cloud.config import get_settings
    from cloud.learn.rounds import where
    from cloud.store.connect import redis_client
    from cloud.tasks import resume_round
    from cloud.tasks import retrain as retrain_task
    from shared.errors import ConfigError

    if fleet is None and resume is None:
        typer.secho("error: give --fleet F (a new round) or --resume N", fg="red", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    url = settings.redis_url.split("@")[-1]  # no password in what is printed
    try:
        redis_client(settings.model_copy(update={"redis_connect_timeout_s": 3})).ping()
    except (redis.RedisError, ConfigError) as exc:
        typer.secho(
            f"error: the Celery broker (Redis at {url}) does not answer: {exc}. Start Redis "
            "(scripts/services up) or set EDGELOOP_REDIS_URL, and run `edgeloop cloud worker`.",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from exc
    sessions = _sessions()
    try:
        if resume is not None:
            result = resume_round.delay(resume)
        else:
            result = retrain_task.delay(fleet, profile, reason="manual")
    except Exception as exc:  # kombu raises its own OperationalError family
        typer.secho(f"error: cannot reach the Celery broker: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    what = f"round {resume}" if resume is not None else f"a round for {fleet}/{profile}"
    typer.echo(f"task {result.id} queued: {what}; waiting for a worker …")

    t0, seen = time.monotonic(), ""
    while True:
        now = where(sessions, round_id=resume, task_id=result.id)
        if now != seen:
            seen = now
            typer.echo(f"  {time.monotonic() - t0:6.0f} s  {now}")
        try:
            out = result.get(timeout=2, propagate=False)
            break
        except CeleryTimeout:
            if time.monotonic() - t0 > timeout:
                typer.secho("timed out; the round goes on on the worker", fg="yellow", err=True)
                raise typer.Exit(1) from None
    if result.failed():
        typer.secho(
            f"round failed: {out!r}. `edgeloop cloud rounds` shows the stage "
            "and its error; fix the cause and run this again with --resume ROUND.",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)
    if "skipped" in out:
        typer.echo(out["skipped"])
        return
    verdict = "promoted to champion" if out["promoted"] else "stopped by the gates"
    gates = out["gates"]
    f1 = gates.get("golden_macro_f1")
    typer.echo(
        f"{out['version']} (parent {out['parent']}, new classes {out.get('new_classes', '?')}): "
        f"{verdict}; golden macro-F1 {'?' if f1 is None else f'{f1:.3f}'}"
        + (f", {out['seconds']:.0f} s" if "seconds" in out else "")
    )
    for reason in gates.get("failed", []):
        typer.echo(f"  gate: {reason}")


def rounds(
    fleet: str | None = typer.Option(None, help="Only this fleet."),
    last: int = typer.Option(20, help="How many of the newest rounds."),
) -> None:
    """Learning rounds, newest first: version, state, each stage's attempts and seconds,
    and the error of a failed one (resume it with `edgeloop retrain --resume ROUND`)."""
    from cloud.learn.rounds import recent
    from cloud.learn.state import STAGES

    rows = recent(_sessions(), fleet=fleet, last=last)
    head = f"{'round':>5} {'fleet/profile':<28} {'version':<8} {'state':<10} stages (attempts, s)"
    typer.echo(head)
    typer.echo("-" * len(head))
    for r in rows:
        stages = r.stages or {}
        parts = []
        for stage in STAGES:
            info = stages.get(stage)
            if info is None:
                continue
            mark = "✓" if info.get("done") else ("✗" if info.get("error") else "…")
            secs = f" {info['seconds']:.0f}s" if "seconds" in info else ""
            parts.append(f"{stage}{mark}×{info.get('attempts', 0)}{secs}")
        typer.echo(
            f"{r.id:>5} {r.fleet + '/' + r.profile:<28} {r.version:<8} {r.state:<10} "
            + " ".join(parts)
        )
        errors = [f"{k}: {v['error']}" for k, v in stages.items() if v.get("error")]
        for e in errors:
            typer.echo(f"{'':>6}error in {e}")
