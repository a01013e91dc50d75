"""`edgeloop cloud …`: the cloud's processes and operator commands."""

from __future__ import annotations

import logging
import signal
import socket
import threading

import typer

app = typer.Typer(
    rich_markup_mode="markdown",
    help="Cloud processes (ingest) and operator commands.",
    no_args_is_help=True,
)
log = logging.getLogger("edgeloop.cloud")


@app.command()
def migrate() -> None:
    """Bring the SQL schema to the newest revision (EDGELOOP_DATABASE_URL)."""
    from cloud.config import get_settings
    from cloud.db import migrate as run_migrations

    url = get_settings().resolved_database_url
    run_migrations(url)
    typer.echo(f"schema up to date on {url.split('@')[-1]}")


@app.command("register-device")
def register_device_cmd(
    device_id: str = typer.Argument(..., help="The device's id, as in its topics."),
    fleet: str = typer.Option(..., help="The fleet it belongs to."),
    profile: str = typer.Option("cpu-fp32", help="Its hardware profile."),
) -> None:
    """Provision a device: ingest accepts messages only from registered devices."""
    from cloud.config import get_settings
    from cloud.db import session_factory
    from cloud.ingest import register_device
    from shared.topics import check_name

    check_name(device_id, "device")
    check_name(fleet, "fleet")
    sessions = session_factory(get_settings().resolved_database_url)
    with sessions() as session:
        register_device(session=session, device_id=device_id, fleet=fleet, profile=profile)
    typer.echo(f"registered {fleet}/{device_id} ({profile})")


@app.command()
def ingest(
    fleet: str = typer.Option("+", help="Fleet to serve ('+' for all)."),
    group: str = typer.Option(
        "ingest", help="MQTT shared-subscription group: processes in one group split the traffic."
    ),
    client_id: str | None = typer.Option(
        None,
        help="MQTT client id, stable across restarts so that messages handed to a killed "
        "ingest are delivered again (default: edgeloop-ingest-HOSTNAME).",
    ),
) -> None:
    """Subscribe to device uploads, store them (object store + SQL), and ack. Runs until
    SIGTERM or Ctrl-C."""
    from cloud.config import get_settings
    from cloud.db import session_factory
    from cloud.ingest import Ingestor, IngestService
    from cloud.storage import open_store

    s = get_settings()
    service = IngestService(
        Ingestor(sessions=session_factory(s.resolved_database_url), store=open_store(s)),
        host=s.mqtt_host,
        port=s.mqtt_port,
        fleet=fleet,
        group=group or None,
        client_id=client_id or f"edgeloop-ingest-{socket.gethostname()}",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    log.info("ingest serving fleet %s on %s:%s", fleet, s.mqtt_host, s.mqtt_port)
    stop.wait()
    service.stop()
    c = service.ingestor.counters
    log.info(
        "ingest stopped: %d stored, %d duplicates, dead letters %s",
        c.stored,
        c.duplicates,
        c.dead_letters,
    )


@app.command()
def champion(
    fleet: str = typer.Option(..., help="The fleet."),
    profile: str = typer.Option("cpu-fp32", help="The hardware profile."),
    out: str = typer.Option(..., help="Where to write the package (a device's first model)."),
) -> None:
    """Write the `champion` edge package of a fleet and profile from MLflow to a file."""
    from pathlib import Path

    from cloud.config import get_settings
    from cloud.registry import Registry, model_name

    s = get_settings()
    registry = Registry(
        s.resolved_mlflow_uri,
        experiment=f"edgeloop-{fleet}",
        artifact_location=s.mlflow_artifact_location,
    )
    found = registry.champion(fleet, profile)
    if found is None:
        typer.secho(
            f"error: {model_name(fleet, profile)} has no champion yet; train and promote a "
            "model first",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    version, tags = found
    run_id = registry.client.get_model_version(model_name(fleet, profile), version).run_id
    Path(out).write_bytes(registry.download_package(run_id))
    typer.echo(
        f"wrote {tags.get('edgeloop_version')} (sha256 {tags.get('sha256', '')[:12]}…) to {out}"
    )


@app.command()
def label(
    sample_ids: list[str] = typer.Argument(..., help="Ids of uploaded samples (message ids)."),
    as_: str = typer.Option(..., "--as", help="The class, e.g. normal or idv_06."),
) -> None:
    """Label uploaded windows by hand (source: operator); retraining prefers these labels."""
    from cloud.config import get_settings
    from cloud.db import session_factory
    from cloud.fleet import label_samples
    from shared.errors import EdgeloopError

    sessions = session_factory(get_settings().resolved_database_url)
    with sessions() as session:
        try:
            n = label_samples(session=session, sample_ids=sample_ids, label=as_)
        except EdgeloopError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc
    typer.echo(f"labelled {n} sample(s) as {as_}")


fleet_app = typer.Typer(
    rich_markup_mode="markdown", help="What the fleet is doing.", no_args_is_help=True
)


@fleet_app.command("status")
def fleet_status_cmd(
    fleet: str | None = typer.Option(None, help="Only this fleet."),
) -> None:
    """Devices, profiles, model versions, last seen, samples and dead letters per device."""
    from cloud.config import get_settings
    from cloud.db import session_factory
    from cloud.fleet import fleet_status, unknown_device_dead_letters

    sessions = session_factory(get_settings().resolved_database_url)
    with sessions() as session:
        rows = fleet_status(session=session, fleet=fleet)
        strangers = unknown_device_dead_letters(session=session)
    head = (
        f"{'fleet':<12} {'device':<14} {'profile':<11} {'model':<8} {'state':<8} "
        f"{'last seen (UTC)':<20} {'samples':>8} {'labelled':>8} {'buffer':>6}  dead letters"
    )
    typer.echo(head)
    typer.echo("-" * len(head))
    for r in rows:
        seen = r.last_seen.strftime("%Y-%m-%d %H:%M:%S") if r.last_seen else "never"
        dead = ", ".join(f"{k}={v}" for k, v in sorted(r.dead_letters.items())) or "-"
        typer.echo(
            f"{r.fleet:<12} {r.device_id:<14} {r.profile:<11} "
            f"{r.model_version or '-':<8} {'online' if r.online else 'offline':<8} "
            f"{seen:<20} {r.samples:>8} {r.labelled:>8} "
            f"{'-' if r.buffer_depth is None else r.buffer_depth:>6}  {dead}"
        )
    if strangers:
        typer.echo(
            "\nDead letters from unregistered ids: "
            + ", ".join(f"{k}={v}" for k, v in sorted(strangers.items()))
        )
