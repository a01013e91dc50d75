"""`edgeloop cloud …`: the cloud's processes and operator commands."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import typer

from cloud.commands.broker import revoke_cmd
from cloud.commands.common import sessions as _sessions
from cloud.commands.datasets import register_dataset_cmd
from cloud.commands.fleet import classes_cmd, enroll_cmd, init_fleet_cmd, webhook_cmd
from cloud.commands.gc import gc_cmd
from cloud.commands.models import compress, teacher
from cloud.commands.rollout import rollout_app
from cloud.commands.rounds import beat, retrain, rounds, worker
from cloud.commands.trust import rotate_root_cmd
from shared.errors import EdgeloopError

__all__ = ["app", "compress", "fleet_app", "retrain", "rollout_app"]

app = typer.Typer(
    rich_markup_mode="markdown",
    help="Cloud processes (ingest) and operator commands.",
    no_args_is_help=True,
)
log = logging.getLogger("edgeloop.cloud")
UNWELL_EXIT_S = 30.0  # an ingest not alive (cloud.ingest.health) this long exits (code 1)


app.command("register-dataset")(register_dataset_cmd)
app.command("init")(init_fleet_cmd)
app.command("webhook")(webhook_cmd)
app.command("gc")(gc_cmd)


@app.command()
def migrate() -> None:
    """Bring the SQL schema to the newest revision (EDGELOOP_DATABASE_URL)."""
    from cloud.config import get_settings
    from cloud.store.db import migrate as run_migrations

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
    from cloud.store.records import register_device
    from shared.topics import check_name

    check_name(device_id, "device")
    check_name(fleet, "fleet")
    sessions = _sessions()
    with sessions() as session:
        register_device(session=session, device_id=device_id, fleet=fleet, profile=profile)
    typer.echo(f"registered {fleet}/{device_id} ({profile})")


@app.command()
def ingest(
    fleet: str = typer.Option("+", help="Fleet to serve ('+' for all)."),
    group: str = typer.Option(
        "ingest", help="MQTT shared-subscription group: processes in one group split the traffic."
    ),
    slot: int | None = typer.Option(
        None,
        min=0,
        max=9999,
        help="This replica's slot in its group (0, 1, …; default EDGELOOP_INGEST_SLOT or 0). "
        "The MQTT client id comes from it, so a restarted or recreated replica resumes the "
        "broker session its slot left (kept EDGELOOP_INGEST_SESSION_EXPIRY_S after a "
        "process goes; docs/ingest-sessions.md). Each running replica needs its own slot.",
    ),
    client_id: str | None = typer.Option(
        None,
        help="MQTT client id (default: edgeloop-ingest/GROUP/SLOT, or "
        "edgeloop-ingest/GROUP/FLEET/SLOT with --fleet).",
    ),
    health_port: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="Serve liveness at http://HEALTH_HOST:PORT/healthz: 200 while every worker "
        "thread runs and none is stuck, else 503; a JSON body with the last batch's time "
        "and counters (default: not served).",
    ),
    health_host: str = typer.Option(
        "127.0.0.1", help="Where /healthz listens (0.0.0.0 for a probe from outside)."
    ),
) -> None:
    """Subscribe to device uploads, store them (object store + SQL), and ack. Runs until
    SIGTERM or Ctrl-C. Quotas and dead-letter caps: EDGELOOP_INGEST_* and each fleet's
    settings (docs/security-ingest.md)."""
    from cloud.config import get_settings
    from cloud.ingest.health import serve_health
    from cloud.ingest.ingestor import Ingestor
    from cloud.ingest.limits import IngestLimits
    from cloud.ingest.members import Membership, ingest_client_id
    from cloud.ingest.service import IngestService
    from cloud.store.db import migrate, session_factory
    from cloud.store.objects import open_store

    s = get_settings()
    migrate(s.resolved_database_url)  # a service brings the schema up to date at its start
    sessions = session_factory(s.resolved_database_url, s)
    slot = s.ingest_slot if slot is None else slot
    client_id = client_id or ingest_client_id(group or "-", fleet, slot)
    service = IngestService(
        Ingestor(sessions=sessions, store=open_store(s), limits=IngestLimits.from_settings(s)),
        host=s.mqtt_host,
        port=s.mqtt_port,
        options=s.mqtt_options(),
        fleet=fleet,
        group=group or None,
        client_id=client_id,
        session_expiry_s=s.ingest_session_expiry_s,
        membership=Membership(
            sessions=sessions,
            group=group or "-",
            fleet=fleet,
            slot=slot,
            client_id=client_id,
            session_expiry_s=s.ingest_session_expiry_s,
            heartbeat_s=s.ingest_heartbeat_s,
        ),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    health = None
    if health_port is not None:
        health = serve_health(service.health, port=health_port, host=health_host)
        log.info("ingest liveness at http://%s:%s/healthz", *health.server_address[:2])
    log.info(
        "ingest slot %d (%s) serving fleet %s on %s:%s", slot, client_id, fleet, s.mqtt_host,
        s.mqtt_port,
    )  # fmt: skip
    # A dead or stuck worker: leave the group and exit non-zero, for the restart policy
    # (a process that stays subscribed would keep taking its share of the traffic).
    unwell_since: float | None = None
    unwell = False
    while not stop.wait(0.5) and not service.taken_over.is_set():
        if service.health()["alive"]:
            unwell_since = None
        elif unwell_since is None:
            unwell_since = time.monotonic()
        elif time.monotonic() - unwell_since > UNWELL_EXIT_S:
            log.error("ingest not alive for %.0f s (%s); stopping", UNWELL_EXIT_S,
                      service.health())  # fmt: skip
            unwell = True
            break
    service.stop()
    if health is not None:
        health.shutdown()
    c = service.ingestor.counters
    log.info(
        "ingest stopped: %d stored, %d duplicates, dead letters %s",
        c.stored,
        c.duplicates,
        c.dead_letters,
    )
    if service.taken_over.is_set() or unwell:
        raise typer.Exit(1)


@app.command()
def champion(
    fleet: str = typer.Option(..., help="The fleet."),
    profile: str = typer.Option("cpu-fp32", help="The hardware profile."),
    out: str = typer.Option(..., help="Where to write the package (a device's first model)."),
) -> None:
    """Write the `champion` edge package of a fleet and profile from MLflow to a file."""
    from cloud.config import get_settings
    from cloud.tracking.registry import open_registry
    from shared.package import model_name

    registry = open_registry(get_settings(), fleet)
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
    assert run_id is not None  # every edgeloop version is registered from a run
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
    from cloud.rollout.fleet import label_samples

    sessions = _sessions()
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
    """Devices, profiles, model versions, last seen, samples and dead letters per device;
    then the ingest processes: slot, client id, heartbeat and last batch of each."""
    from cloud.ingest.members import format_members, ingest_members
    from cloud.rollout.fleet import fleet_status, format_status, unknown_device_dead_letters

    sessions = _sessions()
    with sessions() as session:
        rows = fleet_status(session=session, fleet=fleet)
        strangers = unknown_device_dead_letters(session=session)
        members = ingest_members(session=session, fleet=fleet)
    typer.echo(format_status(rows, strangers))
    typer.echo(format_members(members))


fleet_app.command("enroll")(enroll_cmd)
fleet_app.command("revoke")(revoke_cmd)
fleet_app.command("classes")(classes_cmd)
fleet_app.command("rotate-root")(rotate_root_cmd)

# The longer commands live beside the parts they drive; registered here (in the order
# `--help` lists them), where the entry points and `edgeloop cloud` find them.
app.command()(teacher)
app.command()(worker)
app.command()(beat)
app.command()(rounds)
