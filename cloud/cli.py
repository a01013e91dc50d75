"""`edgeloop cloud …`: the cloud's processes and operator commands."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

import typer

from shared.errors import DataError, EdgeloopError

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


@app.command()
def teacher(
    data: Path = typer.Option(..., help="Training windows (.npz from `edgeloop data generate`)."),
    out: Path = typer.Option(Path("teacher.safetensors"), help="Checkpoint to write."),
    backbone: str = typer.Option("patchtst", help="patchtst, or deepseek (MLA + MoE)."),
    layers: int = typer.Option(6, min=1),
    d_model: int = typer.Option(64, min=8),
    heads: int = typer.Option(4, min=1),
    ffn: int = typer.Option(128, min=8),
    epochs: int = typer.Option(40, min=1),
) -> None:
    """Train a transformer teacher on labelled windows; writes spec + weights (safetensors)."""
    import numpy as np
    from tqdm import tqdm

    from cloud.datasets import read_windows_file
    from cloud.models import BACKBONES, ModelSpec, build, to_bytes
    from cloud.training import TrainConfig, train

    if backbone not in BACKBONES:
        raise typer.BadParameter(f"choose one of {BACKBONES}", param_hint="--backbone")
    try:
        x, y, names = read_windows_file(data)
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    spec = ModelSpec(
        backbone=backbone,
        window=x.shape[1],
        channels=x.shape[2],
        n_classes=len(names),
        layers=layers,
        d_model=d_model,
        heads=heads,
        ffn=ffn,
    )
    model = build(spec, x[y == 0])
    with tqdm(total=epochs, desc=f"{backbone} teacher", unit="epoch") as bar:

        def on_epoch(_e: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()

        train(model, x, y, TrainConfig(epochs=epochs, lr=2e-3), on_epoch=on_epoch)
    out.write_bytes(to_bytes(model.eval(), names))
    params = sum(int(np.prod(p.shape)) for p in model.parameters())
    typer.echo(f"wrote {out}: {backbone}, {layers} layers, {params} parameters, {names}")


def compress(
    profile: str = typer.Option(..., help="Hardware profile, e.g. rpi4-int8, jetson-fp16."),
    teacher: Path = typer.Option(..., help="Teacher checkpoint (`edgeloop cloud teacher`)."),
    data: Path = typer.Option(..., help="Windows the student learns from (.npz)."),
    golden: Path = typer.Option(..., help="Frozen golden windows that measure (.npz)."),
    out: Path = typer.Option(Path("compressed"), help="Folder for the package and report."),
    version: str = typer.Option("v1", help="Version written into the package manifest."),
    fleet: str = typer.Option("default", help="Fleet, for the package's name."),
    epochs: int = typer.Option(40, min=1, help="Distillation epochs per student setting."),
    profiles_file: Path = typer.Option(None, help="Profiles TOML (default: the shipped one)."),
) -> None:
    """Compress a teacher for one class of device: prune (block influence, FFN channels),
    distil, quantize per layer, and measure **the exact package** a device will load.

    Writes `<profile>.edgepkg`, `report.json`, `report.md` (stages and the layer-by-layer
    quantization table) and `stages.png`. Exits 2, naming the budget, when no student
    setting of the profile meets its budgets.
    """
    from cloud.compression import DistillConfig, format_stages, write_report
    from cloud.compression import compress as run_compress
    from cloud.datasets import read_windows_file
    from cloud.models import from_bytes
    from cloud.profiles import get_profile
    from cloud.quantization import format_table
    from cloud.training import ood_calibration

    try:
        hw = get_profile(profile, profiles_file)
        model, names = from_bytes(teacher.read_bytes())
        x, y, data_names = read_windows_file(data)
        gx, gy, golden_names = read_windows_file(golden)
        if not names == data_names == golden_names:
            raise DataError(
                f"class names differ: teacher {names}, data {data_names}, golden {golden_names}"
            )
        if names[0] != "normal":
            raise DataError(
                f"class 0 must be 'normal' (the anomaly scores calibrate on it), got {names[0]!r}"
            )
        result = run_compress(
            model,
            x=x,
            y=y,
            golden_x=gx,
            golden_y=gy,
            class_names=names,
            profile=hw,
            ood=ood_calibration(x[y == 0]),
            name=f"edgeloop.{fleet}.{hw.name}",
            version=version,
            distill_cfg=DistillConfig(epochs=epochs),
            progress=lambda msg: typer.echo(f"[{hw.name}] {msg}", err=True),
        )
    except (EdgeloopError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except (ValueError, KeyError, RuntimeError) as exc:  # e.g. a file that is no checkpoint
        typer.secho(
            f"error: cannot use {teacher} with {data}: {exc!r}; pass a checkpoint from "
            "`edgeloop cloud teacher` and windows of the same shape",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from exc
    paths = write_report(result, out)
    s = result.summary()
    typer.echo(format_stages(result))
    typer.echo("\n" + format_table(result.table))
    typer.echo(
        f"\n{paths['package']}: {s['edge_bytes'] / 1024:.1f} KB "
        f"({s['size_ratio']:.1f}x smaller than the teacher), p50 {s['edge_latency_ms']:.3f} ms "
        f"({s['speedup']:.1f}x faster), macro-F1 {100 * s['edge_macro_f1']:.1f} "
        f"(teacher {100 * s['teacher_macro_f1']:.1f}); sha256 {result.sha256[:16]}…\n"
        f"report: {paths['markdown']}, plot: {paths['plot']}"
    )


@app.command()
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


@app.command()
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
    from sqlalchemy import select

    from cloud.config import get_settings
    from cloud.db import Round, session_factory
    from cloud.tasks import resume_round
    from cloud.tasks import retrain as retrain_task

    if fleet is None and resume is None:
        typer.secho("error: give --fleet F (a new round) or --resume N", fg="red", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    url = settings.redis_url
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        typer.secho(
            f"error: the Celery broker (Redis at {url}) does not answer: {exc}. Start Redis "
            "(scripts/services up) or set EDGELOOP_REDIS_URL, and run `edgeloop cloud worker`.",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from exc
    sessions = session_factory(settings.resolved_database_url)
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

    def where() -> str:
        with sessions() as s:
            row = (
                s.get(Round, resume)
                if resume is not None
                else s.scalar(select(Round).where(Round.task_id == result.id))
            )
            if row is None or (resume is not None and row.state == "failed"):
                return "queued"  # not yet picked up by a worker
            info = (row.stages or {}).get(row.state, {})
            return f"round {row.id} {row.version}: {row.state} {info.get('progress', '')}".rstrip()

    t0, seen = time.monotonic(), ""
    while True:
        now = where()
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


@app.command()
def rounds(
    fleet: str | None = typer.Option(None, help="Only this fleet."),
    last: int = typer.Option(20, help="How many of the newest rounds."),
) -> None:
    """Learning rounds, newest first: version, state, each stage's attempts and seconds,
    and the error of a failed one (resume it with `edgeloop retrain --resume ROUND`)."""
    from sqlalchemy import select

    from cloud.config import get_settings
    from cloud.db import Round, session_factory
    from cloud.learning import STAGES

    sessions = session_factory(get_settings().resolved_database_url)
    with sessions() as s:
        query = select(Round).order_by(Round.id.desc()).limit(last)
        if fleet is not None:
            query = query.where(Round.fleet == fleet)
        rows = s.scalars(query).all()
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
