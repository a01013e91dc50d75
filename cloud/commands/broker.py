"""Devices' broker identities from the command line: the credentials `edgeloop fleet
enroll` issues and writes for the device, and `edgeloop fleet revoke`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cloud.commands.common import sessions as _sessions
from shared.errors import EdgeloopError

if TYPE_CHECKING:
    from cloud.config import CloudSettings

CREDENTIALS_FILE = "mqtt.env"  # the device's EDGELOOP_EDGE_* login, 0600
CA_FILE = "broker-ca.crt"


def issue_credentials(
    *, settings: CloudSettings, fleet: str, device_id: str, out: Path
) -> dict[str, str]:
    """Create the device's broker client (new password, bound to its client id), write
    its login to ``out/mqtt.env`` (0600) and the broker's CA beside it, and record in the
    database that it was done. Returns what device.json says of it (no secret). Without
    an admin identity configured, issues nothing (embedded broker) unless in production."""
    from cloud.rollout.identity import BrokerAdmin
    from cloud.store.records import record_credentials

    if not settings.mqtt_admin_username:
        if settings.mode == "production":
            raise EdgeloopError(
                "production needs device credentials: set EDGELOOP_MQTT_ADMIN_USERNAME and "
                "EDGELOOP_MQTT_ADMIN_PASSWORD (broker.env from scripts/certs)",
                reason="broker_identity",
            )
        typer.echo("no EDGELOOP_MQTT_ADMIN_USERNAME: no broker credentials issued")
        return {}
    from cloud.store.records import get_fleet

    with _sessions()() as session:  # the byte budget ingest holds the device to
        row = get_fleet(session, fleet)
        budget = (row.settings if row is not None else {}).get(
            "upload_bytes_per_hour", settings.ingest_upload_bytes_per_hour
        )
    with BrokerAdmin(settings.mqtt_options(admin=True)) as admin:
        creds = admin.issue(fleet, device_id)
    lines = {
        "EDGELOOP_EDGE_FLEET": fleet,
        "EDGELOOP_EDGE_DEVICE_ID": device_id,
        "EDGELOOP_EDGE_MQTT_HOST": settings.mqtt_host,
        "EDGELOOP_EDGE_MQTT_PORT": str(settings.mqtt_port),
        "EDGELOOP_EDGE_MQTT_TLS": str(settings.mqtt_tls).lower(),
        "EDGELOOP_EDGE_MQTT_USERNAME": creds.username,
        "EDGELOOP_EDGE_MQTT_PASSWORD": creds.password,
        # The same budget ingest's quota is made from (ingest_upload_bytes_per_hour, or
        # the fleet's own): a device that keeps to it is never throttled.
        "EDGELOOP_EDGE_UPLOAD_BYTES_PER_HOUR": str(int(budget)),
    }
    if settings.mqtt_ca_file:
        shutil.copyfile(settings.mqtt_ca_file, out / CA_FILE)
        lines["EDGELOOP_EDGE_MQTT_CA_FILE"] = CA_FILE  # relative: the agent's working folder
    target = out / CREDENTIALS_FILE
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed with looser bits
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in lines.items())
    with _sessions()() as session:
        record_credentials(session=session, device_id=device_id, username=creds.username)
    return {"mqtt_username": creds.username, "mqtt_client_id": creds.client_id}


def revoke_cmd(
    device_id: str = typer.Argument(..., help="The device to take out."),
) -> None:
    """Revoke a device at once: the broker disconnects it now and refuses its credentials
    from then on (it can neither publish nor reconnect), and ingest refuses whatever of its
    messages is still on the way. `edgeloop fleet enroll` issues it new credentials."""
    from cloud.config import get_settings
    from cloud.rollout.identity import BrokerAdmin
    from cloud.store.records import revoke_device

    settings = get_settings()
    try:
        with _sessions()() as session:
            device = revoke_device(session=session, device_id=device_id)
            fleet = device.fleet
        with BrokerAdmin(settings.mqtt_options(admin=True)) as admin:
            admin.revoke(fleet, device_id)
    except EdgeloopError as exc:
        typer.secho(f"error: {exc} (run revoke again once fixed)", fg="red", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"revoked {fleet}/{device_id}: disconnected from the broker and refused by ingest")
