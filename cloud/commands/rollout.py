"""`edgeloop rollout promote|status|pause|resume|abort`: a champion moved (its mover
recorded), what the rollouts are doing, and steering one (the Celery beat carries out what
these record)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import typer

from cloud.commands.common import sessions
from shared.errors import EdgeloopError

rollout_app = typer.Typer(
    help="Rollouts of champion models to devices: promote, status, pause, resume, abort.",
    no_args_is_help=True,
)

FIGURES = (  # the last judgement's figures worth a line, and how to print them
    ("anomaly_before", "anomaly rate before", ".3f"),
    ("anomaly_after", "anomaly rate after", ".3f"),
    ("p_value", "p (one-sided, rise)", ".3g"),
    ("windows_after", "windows after", "d"),
    ("latency_ms_p99_after", "p99 latency ms", ".2f"),
    ("latency_ms_p99_budget", "p99 budget ms", ".2f"),
    ("memory_mb_after", "memory MB", ".0f"),
    ("memory_mb_budget", "memory budget MB", ".0f"),
    ("accuracy_target", "labelled accuracy, target", ".1%"),
    ("accuracy_previous", "labelled accuracy, previous", ".1%"),
)


def _fail(exc: EdgeloopError) -> typer.Exit:
    typer.secho(f"error: {exc}", fg="red", err=True)
    return typer.Exit(1)


def _when(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _summary_lines(rows: list[Any], counts: dict[int, Counter]) -> list[str]:
    head = (
        f"{'id':>5} {'fleet':<12} {'profile':<11} {'target':<8} {'from':<8} {'state':<12} "
        f"{'wave':>6} {'devices (installed/failed/rolled back/total)':<45} started (UTC)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = counts.get(r.id, Counter())
        waves = f"{r.wave + 1}/{len(r.plan)}" if r.plan else "-"
        devices = f"{c['installed']}/{c['failed']}/{c['rolled_back']}/{sum(c.values())}"
        lines.append(
            f"{r.id:>5} {r.fleet:<12} {r.profile:<11} {r.target_version:<8} "
            f"{str(r.params.get('previous') or '-'):<8} {r.state:<12} {waves:>6} "
            f"{devices:<45} {_when(r.created_at)}"
        )
    return lines


def _detail_lines(r: Any, updates: list[Any], deltas: Sequence[Any] = ()) -> list[str]:
    lines = [
        f"rollout {r.id}: {r.fleet}/{r.profile} → {r.target_version} (MLflow version "
        f"{r.mlflow_version}, by {r.trigger}), {r.state}",
        f"  champion moved by {r.moved_by or '-'}",
        f"  started {_when(r.created_at)}, finished {_when(r.finished_at)}, "
        f"release {r.release or '-'}, MLflow run {r.mlflow_run_id or '-'}",
    ]
    if r.reason:
        lines.append(f"  reason: {r.reason}")
    settings = r.params.get("settings", {})
    lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    health = r.health or {}
    if health:
        verdict = "abort" if health.get("abort") else "healthy"
        lines.append(f"  last judgement (wave {health.get('wave', '?')}): {verdict}")
        for reason in health.get("reasons", []):
            lines.append(f"    - {reason}")
        for key, label, spec in FIGURES:
            if health.get(key) is not None:
                lines.append(f"    {label:<28} {format(health[key], spec)}")
    for d in deltas:
        size = "not smaller than the package" if d.length is None else f"{d.length} bytes"
        lines.append(
            f"  delta from {d.base_version}: {size} (package {d.target_length} bytes), "
            f"applied by {', '.join(d.devices) or 'none yet'}"
        )
    lines.append(
        f"  {'device':<14} {'wave':>4} {'state':<12} {'from':<8} {'payload':<8} "
        f"{'received':>9} reason"
    )
    for u in sorted(updates, key=lambda u: (u.wave, u.device_id)):
        payload = "package" if u.delta_refused else (u.payload or "-")
        got = "-" if u.received_bytes is None else str(u.received_bytes)
        why = u.reason or (f"delta refused: {u.delta_refused}" if u.delta_refused else "")
        lines.append(
            f"  {u.device_id:<14} {u.wave:>4} {u.state:<12} {u.base_version or '-':<8} "
            f"{payload:<8} {got:>9} {why}"
        )
    return lines


@rollout_app.command("status")
def status(
    rollout_id: int | None = typer.Argument(None, help="One rollout, with its devices."),
    fleet: str | None = typer.Option(None, help="Only this fleet's rollouts."),
    limit: int = typer.Option(20, min=1, help="How many of the newest rollouts to list."),
) -> None:
    """The newest rollouts (state, wave, devices by state), or one in detail: its last
    judgement with every figure, and each device's state."""
    from sqlalchemy import func, select

    from cloud.rollout.deltas import lineage
    from cloud.store.db import DeviceUpdate, Rollout

    with sessions()() as session:
        if rollout_id is not None:
            r = session.get(Rollout, rollout_id)
            if r is None:
                typer.secho(f"error: no rollout {rollout_id}", fg="red", err=True)
                raise typer.Exit(1)
            updates = session.scalars(
                select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id)
            )
            made = lineage(session, fleet=r.fleet, profile=r.profile, version=r.target_version)
            typer.echo("\n".join(_detail_lines(r, list(updates), made)))
            return
        newest = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
        rows = list(session.scalars(newest.where(Rollout.fleet == fleet) if fleet else newest))
        counts: dict[int, Counter] = {r.id: Counter() for r in rows}
        for rid, state, n in session.execute(
            select(DeviceUpdate.rollout_id, DeviceUpdate.state, func.count())
            .where(DeviceUpdate.rollout_id.in_(list(counts)))
            .group_by(DeviceUpdate.rollout_id, DeviceUpdate.state)
        ):
            counts[rid][state] = n
    if not rows:
        typer.echo("no rollouts" + (f" in fleet {fleet}" if fleet else ""))
        return
    typer.echo("\n".join(_summary_lines(rows, counts)))


@rollout_app.command("pause")
def pause(rollout_id: int = typer.Argument(..., help="The rollout to pause.")) -> None:
    """Send no further wave (devices already offered the model finish installing it)."""
    from cloud.rollout.controller import pause as do_pause

    try:
        r = do_pause(sessions=sessions(), rollout_id=rollout_id)
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    typer.echo(f"rollout {r.id} paused at wave {r.wave + 1}; `edgeloop rollout resume {r.id}`")


@rollout_app.command("resume")
def resume(rollout_id: int = typer.Argument(..., help="The paused rollout.")) -> None:
    """Go on from where the rollout was paused (its wave's timeout starts again)."""
    from cloud.rollout.controller import resume as do_resume

    try:
        r = do_resume(sessions=sessions(), rollout_id=rollout_id)
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    typer.echo(f"rollout {r.id} resumed ({r.state})")


@rollout_app.command("abort")
def abort(
    rollout_id: int = typer.Argument(..., help="The rollout to abort."),
    reason: str = typer.Option("aborted by an operator", help="Recorded with the rollout."),
) -> None:
    """Stop the rollout and roll every device it reached back to its previous model (by a
    new signed release, which the beat publishes and offers)."""
    from cloud.rollout.controller import abort as do_abort

    try:
        r = do_abort(sessions=sessions(), rollout_id=rollout_id, reason=reason)
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    then = "its devices roll back" if r.state == "rolling_back" else "no device was reached"
    typer.echo(f"rollout {r.id} {r.state}: {then}")


@rollout_app.command("promote")
def promote(
    version: str = typer.Argument(..., help="The edgeloop version to make champion, e.g. v3."),
    fleet: str = typer.Option(..., help="Its fleet."),
    profile: str = typer.Option(..., help="Its hardware profile, e.g. rpi4-int8."),
    by: str | None = typer.Option(
        None,
        help="Who moves it, recorded with the rollout it starts (default: your login name, "
        "and the MLflow account of EDGELOOP_MLFLOW_TRACKING_USERNAME if set).",
    ),
) -> None:
    """Move the profile's `champion` alias in MLflow to VERSION, recording who moved it:
    the rollout it starts (by MLflow's webhook, or the next reconcile) shows the mover in
    `edgeloop rollout status ID`. A move made in the MLflow UI starts a rollout too, but
    MLflow's alias events name no user: its mover shows as unknown."""
    import getpass

    from cloud.config import get_settings
    from cloud.rollout.controller import RolloutError
    from cloud.tracking.registry import open_registry
    from shared.package import model_name

    settings = get_settings()
    who = by or getpass.getuser()
    account = settings.mlflow_tracking_username
    if account and account != who:
        who = f"{who} (MLflow account {account})"
    try:
        registry = open_registry(settings, fleet)
        found = registry.find_version(fleet, profile, version)
        if found is None:
            raise RolloutError(
                f"{model_name(fleet, profile)} has no registered version {version}",
                reason="unknown_model_version",
            )
        registry.promote(model_name(fleet, profile), found[0], by=who)
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"champion of {model_name(fleet, profile)} is now {version} (MLflow version "
        f"{found[0]}), moved by {who}; its rollout starts at once (webhook) or at the next "
        "reconcile: `edgeloop rollout status`"
    )
