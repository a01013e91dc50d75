"""`edgeloop cloud gc`: garbage collection by the retention policy, or its plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cloud.commands.common import sessions as _sessions
from shared.errors import EdgeloopError

if TYPE_CHECKING:
    from cloud.retention.plan import Plan
    from cloud.retention.sweep import Swept

HELP = """Delete what the retention policy lets expire, and print the plan as a table.

What expires (settings `EDGELOOP_RETENTION_*`, days; 0 keeps forever; a fleet overrides
any of them in its row's settings under the same name):

* uploads: labelled after `retention_samples_days`, unlabelled after
  `retention_unlabelled_days` (a batch object goes once none of its windows is left);
* dead letters and their raw payloads after `retention_dead_letters_days`;
* cached deltas after `retention_deltas_days` (a rollout makes them again on demand);
* model versions beyond the newest `retention_versions_keep` per profile: the MLflow
  model version, its package, checkpoint, student and replay reservoir (the row stays,
  marked expired: version numbers are never reused);
* MLflow runs older than `retention_mlflow_runs_days` (their artifacts, then the run).

Never deleted, whatever the policy: a version a device runs, a version a rollout in flight
goes to or from (its rollback base, its delta bases), a version an alias names
(champion, challenger, …); the uploads the lineage of a kept version names (its round's
training, validation and held-out windows, what it replayed, its replay reservoir); every
upload of a fleet while one of its rounds is under way; the deltas and runs a rollout in
flight uses; the run a kept version was registered from.

Only one collection runs at a time (a lock in Redis, shared with the daily beat task
`edgeloop.gc`). `--dry-run` deletes nothing and needs no lock. docs/retention.md says more.
"""


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError


def plan_lines(plan: Plan, swept: Swept | None = None) -> list[str]:
    """The plan's table (with what was deleted, after a sweep) and its notes."""
    p = plan.policy
    head = (
        f"fleet {plan.fleet} (samples {p.samples_days:g} d, unlabelled {p.unlabelled_days:g} d, "
        f"dead letters {p.dead_letters_days:g} d, deltas {p.deltas_days:g} d, keep "
        f"{p.versions_keep} versions, runs {p.mlflow_runs_days:g} d)"
        if plan.fleet is not None
        else f"dead letters of no fleet (kept {p.dead_letters_days:g} d)"
    )
    done = "" if swept is None else f"{'deleted':>9}"
    lines = [head, f"  {'kind':<13}{'count':>7}{'bytes':>11}{done}{'protected':>11}  why protected"]
    for row in plan.table():
        if plan.fleet is None and row.kind != "dead_letters":
            continue
        done = "" if swept is None else f"{swept.deleted.get(row.kind, 0):>9}"
        lines.append(
            f"  {row.kind:<13}{row.count:>7}{_bytes(row.bytes):>11}{done}{row.protected:>11}"
            f"  {row.why or '-'}"
        )
    lines += [f"  note: {n}" for n in plan.notes + (swept.notes if swept is not None else [])]
    return lines


def gc_cmd(
    fleet: str | None = typer.Option(None, help="Only this fleet (default: every fleet)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; delete nothing."),
    without_lock: bool = typer.Option(
        False,
        "--without-lock",
        help="Run without the gc lock in Redis (one machine without Redis, no worker running).",
    ),
) -> None:
    import redis

    from cloud.config import get_settings
    from cloud.retention.run import GcRunning, run_gc
    from cloud.store.objects import open_store
    from cloud.tracking.retention import open_retention_tracker

    settings = get_settings()
    sessions = _sessions()
    try:
        done = run_gc(
            settings=settings,
            sessions=sessions,
            store=open_store(settings),
            tracker=open_retention_tracker(settings),
            fleet=fleet,
            dry_run=dry_run,
            locked=not without_lock,
            say=lambda line: None,
        )
    except (EdgeloopError, GcRunning) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    except redis.RedisError as exc:
        typer.secho(
            f"error: Redis at {settings.redis_url} did not answer ({exc}); the gc lock lives "
            "there: start Redis, or pass --without-lock if no worker runs gc",
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from exc
    for plan, swept in done:
        typer.echo("\n".join(plan_lines(plan, swept)))
    if dry_run:
        typer.echo("dry run: nothing deleted")


gc_cmd.__doc__ = HELP
