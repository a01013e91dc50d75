"""`edgeloop cloud …`: the cloud's processes and operator commands."""

from __future__ import annotations

import logging
import signal
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
    registry = Registry(s.resolved_mlflow_uri, experiment=f"edgeloop-{fleet}")
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
