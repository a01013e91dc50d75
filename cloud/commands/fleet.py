"""A fleet's life from the command line: `edgeloop cloud init` (data sets, allow-list, trust
root, first model per profile), `edgeloop cloud webhook` (the receiver MLflow tells of a
moved champion), `edgeloop fleet enroll` and `edgeloop fleet classes`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cloud.commands.common import sessions as _sessions
from shared.errors import EdgeloopError

if TYPE_CHECKING:
    from cloud.config import CloudSettings

ROLLOUT_TASK = "edgeloop.rollout.on_alias"  # (fleet, profile, mlflow_version, trigger)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg="red", err=True)
    return typer.Exit(2)


def init_fleet_cmd(
    fleet: str = typer.Option(..., help="The new fleet's name (as in its devices' topics)."),
    base: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="Base training windows (.npz: x, y, class_names)."
    ),
    golden: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="The frozen golden set: gates and reports only."
    ),
    validation: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="Validation windows (other episodes): early stopping and the student choice. "
        "Needed by every compressing profile.",
    ),
    profile: list[str] = typer.Option(
        ..., "--profile", help="A hardware profile to ship to (repeat, or a,b)."
    ),
    classes: list[str] | None = typer.Option(
        None,
        "--classes",
        help="The classes devices may label (repeat, or a,b; default: the base set's classes). "
        "`edgeloop fleet classes --add` extends it later.",
    ),
    offline_keys: Path = typer.Option(
        ...,
        help="Where the offline root and targets keys are written (removable media, kept "
        "away from every service); the online keys go to EDGELOOP_TUF_KEYS_DIR.",
    ),
    epochs: int | None = typer.Option(
        None, min=1, help="Training epochs of the first teacher (default EDGELOOP_ROUND_EPOCHS)."
    ),
    teacher: str = typer.Option(
        "auto",
        help="The first teacher: cnn, patchtst or deepseek; auto: a transformer where a "
        "profile compresses (pruning needs one), else the CNN.",
    ),
) -> None:
    """Start a fleet: register its data sets (disjoint from each other), create its row
    with the class allow-list, create its TUF root (root and targets keys offline), and
    train, recompress, gate, register and promote its first model per profile through the
    stages of a learning round. Moving `champion` starts the first rollout (the webhook).
    Run again, it says what exists and does only what is missing."""
    from cloud.compress.profiles import load_profiles
    from cloud.config import get_settings
    from cloud.learn.bootstrap import init_fleet
    from cloud.learn.state import RoundConfig
    from cloud.rollout.signing import SigningError, init_fleet_trust, root_metadata
    from cloud.store.objects import open_store
    from cloud.tracking.registry import open_registry
    from shared.topics import check_name

    profile = [p for item in profile for p in item.split(",") if p]  # a,b or repeated
    classes = [c for item in classes or [] for c in item.split(",") if c] or None
    try:
        check_name(fleet, "fleet")
        for p in profile:
            check_name(p, "profile")
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    settings = get_settings()
    sessions = _sessions()
    store = open_store(settings)
    compressing = [p for p in profile if p in load_profiles()]
    backbone = teacher if teacher != "auto" else ("patchtst" if compressing else "cnn")
    if backbone not in ("cnn", "patchtst", "deepseek"):
        raise typer.BadParameter("choose cnn, patchtst, deepseek or auto", param_hint="--teacher")
    if compressing and backbone == "cnn":
        raise typer.BadParameter(
            f"{compressing} compress by pruning a transformer: --teacher patchtst or deepseek",
            param_hint="--teacher",
        )

    def round_config(p: str) -> RoundConfig:
        cfg = RoundConfig.from_settings(settings, fleet=fleet, profile=p)
        if epochs is not None:
            cfg.train.epochs = epochs
        cfg.teacher = None if backbone == "cnn" else {"backbone": backbone}
        return cfg

    def ensure_trust() -> tuple[bytes, bool]:
        try:
            return root_metadata(store=store, fleet=fleet), False
        except SigningError:
            root = init_fleet_trust(
                store=store,
                fleet=fleet,
                keys_dir=settings.resolved_tuf_keys_dir,
                offline_dir=offline_keys,
            )
            return root, True

    files = {"base": base, "golden": golden}
    if validation is not None:
        files["validation"] = validation
    _register_webhook(settings)
    try:
        report = init_fleet(
            sessions=sessions,
            store=store,
            registry=open_registry(settings, fleet),
            fleet=fleet,
            profiles=profile,
            files=files,
            ensure_trust=ensure_trust,
            round_config=round_config,
            classes=classes,
            say=typer.echo,
        )
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    if not report.created:
        typer.echo(f"fleet {fleet} exists ({'; '.join(report.existed)}): nothing to do")
        return
    typer.echo(
        f"fleet {fleet} ready: {', '.join(report.created)}"
        + (f" (existed: {'; '.join(report.existed)})" if report.existed else "")
    )
    typer.echo(
        f"offline keys in {offline_keys / fleet}: move them off this machine. Enroll "
        f"devices with `edgeloop fleet enroll DEVICE --fleet {fleet} --profile P --out DIR`."
    )


def _register_webhook(settings: CloudSettings) -> None:
    """Point MLflow's alias webhook at the receiver when one is configured, so the first
    champion reaches it; without one, the reconcile beat starts the rollout."""
    from cloud.rollout.webhook import WebhookSettings
    from cloud.tracking.webhooks import ensure_webhook

    hook = WebhookSettings()
    uri = settings.resolved_mlflow_uri
    if not hook.secret or not uri.startswith(("http://", "https://")):
        typer.echo(
            "no EDGELOOP_WEBHOOK_SECRET or no MLflow server: the rollout reconcile picks up "
            "the new champions"
        )
        return
    info = ensure_webhook(
        tracking_uri=uri, url=hook.delivery_url, secret=hook.secret, name=hook.name
    )
    typer.echo(f"MLflow tells {info.url} of champion moves (webhook {info.name})")


def webhook_cmd(
    host: str | None = typer.Option(None, help="Address to listen on (EDGELOOP_WEBHOOK_HOST)."),
    port: int | None = typer.Option(None, help="Port (EDGELOOP_WEBHOOK_PORT, default 8765)."),
    register: bool = typer.Option(
        True,
        help="Create or update MLflow's webhook to deliver to EDGELOOP_WEBHOOK_URL (default "
        "http://HOST:PORT/hooks/mlflow) at start.",
    ),
) -> None:
    """Serve MLflow's registry webhooks: a signed `champion` move of a fleet's model queues
    its rollout (Celery task edgeloop.rollout.on_alias); forged, unsigned, stale and
    replayed calls are refused. Needs EDGELOOP_WEBHOOK_SECRET (shared with MLflow). Runs
    until SIGTERM or Ctrl-C."""
    from pydantic import ValidationError

    from cloud.config import get_settings
    from cloud.rollout.webhook import RedisSeen, WebhookServer, WebhookSettings
    from cloud.store.connect import redis_client
    from cloud.tasks import app as celery
    from cloud.tracking.webhooks import ensure_webhook

    try:
        hook = WebhookSettings()
    except ValidationError as exc:
        raise _fail(exc) from exc
    if not hook.secret:
        typer.secho(
            "error: set EDGELOOP_WEBHOOK_SECRET (at least 16 random characters): an unsigned "
            "receiver would let anyone start a rollout",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    hook.host, hook.port = host or hook.host, port or hook.port

    def on_alias(fleet: str, profile: str, version: str) -> None:
        celery.send_task(ROLLOUT_TASK, args=[fleet, profile, version, "alias"])

    server = WebhookServer(
        secret=hook.secret,
        on_alias=on_alias,
        host=hook.host,
        port=hook.port,
        tolerance_s=hook.tolerance_s,
        # Delivery ids in Redis: a replay to another replica, or after a restart, is refused.
        shared=RedisSeen(redis_client(get_settings())),
    )
    uri = get_settings().resolved_mlflow_uri
    if register and uri.startswith(("http://", "https://")):
        info = ensure_webhook(
            tracking_uri=uri, url=hook.delivery_url, secret=hook.secret, name=hook.name
        )
        typer.echo(f"MLflow webhook {info.name} delivers to {info.url}")
    typer.echo(f"receiving MLflow webhooks on {server.url}")
    server.serve()


def enroll_cmd(
    device_id: str = typer.Argument(..., help="The device's id, as in its topics."),
    fleet: str = typer.Option(..., help="Its fleet (created by `edgeloop cloud init`)."),
    profile: str = typer.Option(..., help="Its hardware profile (the fleet has a model for it)."),
    site: str | None = typer.Option(None, help="Where it stands: canaries spread over sites."),
    tag: list[str] | None = typer.Option(
        None, "--tag", help="KEY=VALUE (repeat): how operators group devices."
    ),
    out: Path = typer.Option(..., help="Folder for the device's enrollment files."),
) -> None:
    """Register a device of a fleet, with its site and tags, and write what it is enrolled
    with: the fleet's TUF root metadata (`root.json`, for `edgeloop edge enroll --root`),
    `device.json` (fleet, device, profile, site, tags, MQTT username) and its broker login
    `mqtt.env` (0600, new credentials bound to its client id; with the broker's CA as
    `broker-ca.crt`). Enrolling again issues new credentials and lifts a revocation."""
    from cloud.commands.broker import issue_credentials
    from cloud.config import get_settings
    from cloud.rollout.signing import root_metadata
    from cloud.store.objects import open_store
    from cloud.store.records import enroll_device
    from shared.topics import check_name

    tags: dict[str, str] = {}
    for item in tag or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    try:
        check_name(device_id, "device")
        check_name(fleet, "fleet")
        with _sessions()() as session:
            device = enroll_device(
                session=session,
                device_id=device_id,
                fleet=fleet,
                profile=profile,
                site=site,
                tags=tags,
            )
        root = root_metadata(store=open_store(get_settings()), fleet=fleet)
        out.mkdir(parents=True, exist_ok=True)
        broker = issue_credentials(
            settings=get_settings(), fleet=fleet, device_id=device_id, out=out
        )
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    (out / "root.json").write_bytes(root)
    identity = {
        "fleet": fleet,
        "device_id": device.id,
        "profile": device.profile,
        "site": device.site,
        "tags": device.tags,
        **broker,
    }
    (out / "device.json").write_text(json.dumps(identity, indent=2) + "\n")
    typer.echo(
        f"enrolled {fleet}/{device_id} ({profile}"
        + (f", site {site}" if site else "")
        + f"); wrote {out / 'root.json'} and {out / 'device.json'}: on the device run "
        f"`edgeloop edge enroll --root root.json`"
    )


def classes_cmd(
    fleet: str = typer.Option(..., help="The fleet."),
    add: list[str] | None = typer.Option(
        None, "--add", help="A class devices may label from now on (repeat for more)."
    ),
) -> None:
    """Show, or extend with --add, the classes devices of a fleet may label (ingest
    dead-letters any other label as label_not_allowed)."""
    from pydantic import TypeAdapter, ValidationError

    from cloud.store.records import allow_classes, get_fleet
    from shared.messages import Name

    for name in add or []:
        try:  # what a device's label must be (ingest refuses anything else)
            TypeAdapter(Name).validate_python(name)
        except ValidationError as exc:
            raise _fail(
                EdgeloopError(f"class {name!r} cannot be a label: {exc.errors()[0]['msg']}")
            ) from exc
    try:
        with _sessions()() as session:
            if add:
                listed = allow_classes(session=session, fleet=fleet, add=add)
            else:
                row = get_fleet(session, fleet)
                if row is None:
                    raise EdgeloopError(
                        f"fleet {fleet!r} has no allow-list (no `edgeloop cloud init`): its "
                        "devices may label any class"
                    )
                listed = list(row.classes)
    except EdgeloopError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{fleet}: devices may label {', '.join(listed)}")
