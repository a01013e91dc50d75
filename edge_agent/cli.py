"""`edgeloop edge …`: run an agent on a device."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer

from shared.errors import EdgeloopError

app = typer.Typer(
    rich_markup_mode="markdown",
    help="The on-device agent: detect, select, buffer, upload, update.",
    no_args_is_help=True,
)
log = logging.getLogger("edgeloop.edge")


@app.command()
def enroll(
    root: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="The fleet's root metadata (root.json)."
    ),
    state_dir: Path | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_STATE_DIR."),
) -> None:
    """Trust a fleet's signed releases: store its root metadata, which
    `edgeloop fleet enroll` hands out. Until then the agent refuses every update offer
    (missing_metadata). Enrolling again replaces what the device trusted."""
    from edge_agent.config import EdgeSettings
    from shared.trust import DeviceTrust

    try:
        overrides: dict[str, Any] = {"state_dir": state_dir} if state_dir else {}
        settings = EdgeSettings(**overrides)
        DeviceTrust.enroll(settings.trust_dir, root.read_bytes())
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"enrolled: {settings.trust_dir} trusts the root in {root}")


@app.command()
def run(
    package: Path | None = typer.Option(
        None, help="Model package to install if the device has none yet (a factory image)."
    ),
    windows: Path | None = typer.Option(
        None,
        help="Windows (N, T, C) to replay as the sensor feed: a .npy file, or the .npz "
        "`edgeloop data generate` writes (its `x`); without it the agent only keeps its "
        "link, heartbeats and takes updates.",
    ),
    rate: float = typer.Option(1.0, min=0.001, help="Windows per second from --windows."),
    fleet: str | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_FLEET."),
    device_id: str | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_DEVICE_ID."),
    mqtt_host: str | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_MQTT_HOST."),
    mqtt_port: int | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_MQTT_PORT."),
    state_dir: Path | None = typer.Option(None, help="Overrides EDGELOOP_EDGE_STATE_DIR."),
) -> None:
    """Run the agent until SIGTERM or Ctrl-C. Settings come from EDGELOOP_EDGE_* env vars
    (or `.env`); the flags above override them."""
    import numpy as np

    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "fleet": fleet,
            "device_id": device_id,
            "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port,
            "state_dir": state_dir,
        }.items()
        if v is not None
    }
    try:
        settings = EdgeSettings(**overrides)
        agent = EdgeAgent(settings)
        if package is not None:
            agent.bootstrap(package.read_bytes())
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    if agent.runtime is None and not agent.enrolled:
        typer.secho(
            "error: no model installed and no fleet root: pass --package (a factory image), or "
            "enroll the device (`edgeloop edge enroll --root FILE`) so that it takes its first "
            "model from the fleet's rollout",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    # np.load with allow_pickle=False: the feed is data, never code.
    feed = np.load(windows, allow_pickle=False) if windows is not None else None
    if isinstance(feed, np.lib.npyio.NpzFile):
        if "x" not in feed.files:
            typer.secho(f"error: {windows} holds {feed.files}, not windows `x`", fg="red", err=True)
            raise typer.Exit(2)
        feed = feed["x"]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent.start()
    log.info(
        "agent %s/%s running %s",
        settings.fleet,
        settings.device_id,
        agent.model_version or "no model yet (waiting for the fleet's rollout)",
    )
    i = 0
    try:
        while not stop.is_set():
            # Until a first model arrives (an enrolled device without one), windows wait.
            if feed is not None and i < len(feed) and agent.runtime is not None:
                try:
                    det, msg = agent.process(feed[i])
                    log.debug(
                        "window %d: %s (%.2f)%s",
                        i,
                        det.predicted,
                        det.confidence,
                        " uploaded" if msg else "",
                    )
                except EdgeloopError as exc:  # a bad window, or a model that just failed
                    log.warning("window %d skipped (%s): %s", i, exc.reason, exc)
                i += 1
            agent.tick()
            stop.wait(1.0 / rate if feed is not None and i < len(feed) else 1.0)
    finally:
        agent.heartbeat()
        agent.sync()
        depth = agent.backlog()
        time.sleep(0.2)
        agent.stop()
        log.info("agent stopped cleanly; %d message(s) stay buffered for next start", depth)
