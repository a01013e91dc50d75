"""What the tests run is what compose runs: the whole production stack of deploy/ started
natively (`scripts/services up --production`: Mosquitto, Redis, PostgreSQL, S3 and MLflow,
each TLS only and with its password), and the cloud's and the edge's processes run with
nothing but the settings `scripts/stack env ROLE... --native` gives them, the same roles
docker-compose.yml gives each service."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import psycopg
import pytest
import requests
import urllib3
from minio import Minio

from shared.package import ModelPackage

from .conftest import unique, wait_for, windows_of
from .production import ProductionBroker, spare_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from shared.cli import main; main()"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The five services, started once; ``started_in_s`` says how long that took."""
    running = ProductionBroker(
        tmp_path_factory.mktemp("prod-stack"), spare_port(), redis_port=spare_port(),
        postgres_port=spare_port(), mlflow_port=spare_port(),
    ).start("mosquitto", "redis", "postgres", "minio", "mlflow")  # fmt: skip
    print(f"\nproduction stack up in {running.started_in_s:.1f} s")
    yield running
    running.stop()


def stack_env(stack: ProductionBroker, *roles: str) -> dict[str, str]:
    """`scripts/stack env ROLE... --native` for this stack's folder and ports."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.environ().items():
            mp.setenv(key, value)
        loader = importlib.machinery.SourceFileLoader("script_stack", str(ROOT / "scripts/stack"))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        assert spec is not None
        script = importlib.util.module_from_spec(spec)
        loader.exec_module(script)
        return script.env_of(list(roles), script.load(), native=True)


def process_env(*layers: dict[str, str]) -> dict[str, str]:
    """This process's environment without any EDGELOOP_ setting, then ``layers``: a
    process sees only what the stack gives it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    for layer in layers:
        base.update(layer)
    return base


def dotenv(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def run(stack: ProductionBroker, cwd: Path, args: list[str], *roles: str) -> str:
    """An `edgeloop` command with the roles' settings, as `docker compose run` gives it."""
    done = subprocess.run(
        [*CLI, *args], env=process_env(stack_env(stack, *roles)), cwd=cwd,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def initialise_fleet(stack: ProductionBroker, fleet: str, package: bytes, offline: Path) -> None:
    """The fleet as `cloud init` leaves it (its row, TUF root, a registered v1) without
    training a teacher: in this process, with the `cli` service's settings. Registering v1
    logs a run in MLflow over HTTPS with basic auth, its artifacts going to the TLS S3."""
    from cloud.config import CloudSettings, get_settings
    from cloud.rollout.signing import init_fleet_trust
    from cloud.store.db import session_factory
    from cloud.store.objects import open_store
    from cloud.store.records import create_fleet
    from cloud.tracking.connect import apply_mlflow_settings
    from cloud.tracking.registry import open_registry
    from tests.fleetkit import register_package

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("EDGELOOP_")]:
            mp.delenv(key)
        for key, value in stack_env(stack, "cloud", "rollout").items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        settings = CloudSettings()
        sessions = session_factory(settings.database_url, settings)
        store = open_store(settings)
        with sessions() as s:
            classes = list(ModelPackage(package).manifest.class_names)
            create_fleet(session=s, fleet=fleet, classes=classes)
        init_fleet_trust(
            store=store, fleet=fleet, keys_dir=settings.resolved_tuf_keys_dir,
            offline_dir=offline,
        )  # fmt: skip
        register_package(
            sessions=sessions, store=store, registry=open_registry(settings, fleet),
            fleet=fleet, package=package,
        )  # fmt: skip
    get_settings.cache_clear()
    apply_mlflow_settings(CloudSettings(_env_file=None))  # this process's MLflow env back


def edge_settings(stack: ProductionBroker, enroll: Path, state: Path) -> dict[str, str]:
    """The device as compose's edge-plant-NN runs it: [env.edge], the login enrollment
    wrote (mqtt.env) and the broker's CA beside it."""
    device = json.loads((enroll / "device.json").read_text())
    return process_env(
        stack_env(stack, "edge"), dotenv(enroll / "mqtt.env"),
        {"EDGELOOP_EDGE_FLEET": device["fleet"], "EDGELOOP_EDGE_DEVICE_ID": device["device_id"],
         "EDGELOOP_EDGE_MQTT_CA_FILE": str(enroll / "broker-ca.crt"),
         "EDGELOOP_EDGE_STATE_DIR": str(state),
         "EDGELOOP_EDGE_DIVERSITY_DISTANCE": "0",  # every faulty window is uploaded
         "EDGELOOP_LOG_LEVEL": "DEBUG"},  # it logs each window, and whether it was uploaded
    )  # fmt: skip


def dsn(stack: ProductionBroker, database: str) -> str:
    """The production PostgreSQL over verify-full TLS, with its password."""
    return (
        f"host=localhost port={stack.postgres_port} dbname={database} user=edgeloop "
        f"password={stack.secrets['POSTGRES_PASSWORD']} sslmode=verify-full "
        f"sslrootcert={stack.ca_file}"
    )


def s3_client(stack: ProductionBroker) -> Minio:
    """The production S3 over TLS verified against the stack's CA, with its key."""
    return Minio(
        f"localhost:{stack.minio_port}", access_key=stack.secrets["MINIO_ROOT_USER"],
        secret_key=stack.secrets["MINIO_ROOT_PASSWORD"], secure=True,
        http_client=urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(stack.ca_file)),
    )  # fmt: skip


def test_an_edge_uploads_through_the_cloud_compose_describes(
    stack, tmp_path, tiny_package, tep_small
):
    """Migrate, enroll a device (its broker login), ingest, a real edge agent: over TLS
    everywhere with the stack's passwords, every sample the device uploaded is one row in
    the production PostgreSQL and an object in its S3; the fleet's first model is logged
    and registered in MLflow over HTTPS with basic auth, its artifacts in the same S3."""
    pkg, _ = tiny_package
    fleet, device = unique("plant"), "d1"
    enroll, state = tmp_path / "enroll", tmp_path / "edge-state"
    _, golden = tep_small
    feed = tmp_path / "feed.npz"
    x = np.concatenate([windows_of(golden, c, 8) for c in ("idv_01", "idv_07")])
    np.savez(feed, x=x, y=np.zeros(len(x), np.int64), class_names=np.array(["idv_01"]))
    (tmp_path / "v1.edgepkg").write_bytes(pkg)

    run(stack, tmp_path, ["cloud", "migrate"], "cloud", "rollout")  # compose's `migrate`
    initialise_fleet(stack, fleet, pkg, tmp_path / "offline-keys")
    run(
        stack, tmp_path, ["fleet", "enroll", device, "--fleet", fleet, "--profile",
        ModelPackage(pkg).manifest.profile, "--out", str(enroll)], "cloud", "rollout", "admin",
    )  # fmt: skip
    edge_env = edge_settings(stack, enroll, state)
    trust = subprocess.run(  # compose's edge enrolls its trust from root.json first
        [*CLI, "edge", "enroll", "--root", str(enroll / "root.json")], env=edge_env,
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert trust.returncode == 0, trust.stdout + trust.stderr
    # Ingest exactly as compose runs it (deploy/stack.toml), its liveness on a spare port.
    command = tomllib.loads((ROOT / "deploy" / "stack.toml").read_text())["cloud"]["ingest"][
        "command"
    ]
    health = spare_port()
    command[command.index("--health-port") + 1] = str(health)
    ingest_log, edge_log = tmp_path / "ingest.log", tmp_path / "edge.log"
    with ingest_log.open("w") as ingest_out, edge_log.open("w") as edge_out:
        ingest = subprocess.Popen(
            [*CLI, *command], cwd=tmp_path,
            env=process_env(stack_env(stack, "cloud", "ingest")),
            stdout=ingest_out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        edge = subprocess.Popen(
            [*CLI, "edge", "run", "--package", str(tmp_path / "v1.edgepkg"), "--windows",
             str(feed), "--rate", "50"], env=edge_env, cwd=tmp_path,
            stdout=edge_out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    db = psycopg.connect(dsn(stack, "edgeloop"), autocommit=True)

    def stored() -> list[tuple[str, str]]:
        return db.execute(
            "SELECT id, object_key FROM samples WHERE fleet = %s AND device_id = %s",
            (fleet, device),
        ).fetchall()

    def uploaded() -> int:
        return sum(line.endswith(" uploaded") for line in edge_log.read_text().splitlines())

    def outbox() -> int:
        try:
            with sqlite3.connect(state / "buffer.sqlite3") as conn:
                return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.OperationalError:
            return -1

    try:
        wait_for(lambda: f"window {len(x) - 1}:" in edge_log.read_text(), 90,
                 what="the feed replayed")  # fmt: skip
        # Each upload is acked only once stored: then the device's outbox is empty.
        wait_for(lambda: outbox() == 0 and len(stored()) >= uploaded(), 60,
                 what="the device's samples stored and acked")  # fmt: skip
        rows = stored()
        alive = requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5)
    finally:
        for proc in (edge, ingest):
            proc.send_signal(signal.SIGTERM)
        edge.wait(30)
        ingest.wait(30)
        db.close()

    assert edge.returncode == 0, edge_log.read_text()
    assert ingest.returncode == 0, ingest_log.read_text()
    assert alive.status_code == 200, alive.text  # compose's health check passes
    assert alive.json()["last_batch_at"] is not None, alive.json()
    assert uploaded() > 0 and len(rows) == uploaded()
    assert len({sample_id for sample_id, _ in rows}) == len(rows)
    s3 = s3_client(stack)
    for key in {object_key for _, object_key in rows}:
        assert s3.stat_object("edgeloop", key).size > 0, key
    # The MLflow leg: its run in the production PostgreSQL's mlflow database, the package
    # artifact in the TLS S3's mlflow-artifacts bucket.
    with psycopg.connect(dsn(stack, "mlflow")) as conn:
        runs = conn.execute("SELECT COUNT(*) FROM runs WHERE name LIKE %s", (f"{fleet}-%",))
        assert runs.fetchone()[0] == 1
    artifacts = list(s3.list_objects("mlflow-artifacts", recursive=True))
    assert any(o.object_name.endswith(".edgepkg") for o in artifacts), artifacts


def test_s3_and_mlflow_answer_only_over_tls_with_their_credentials(stack):
    """S3 and MLflow as compose runs them: TLS verified against the stack's CA with the
    credentials works; plain HTTP, a wrong S3 secret, or MLflow without a password does
    not."""
    from minio.error import S3Error

    ca = str(stack.ca_file)
    good = s3_client(stack)
    assert {"edgeloop", "mlflow-artifacts"} <= {b.name for b in good.list_buckets()}
    wrong = Minio(
        f"localhost:{stack.minio_port}", access_key=stack.secrets["MINIO_ROOT_USER"],
        secret_key="not-it", secure=True,
        http_client=urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca),
    )  # fmt: skip
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        wrong.list_buckets()
    mlflow = f"https://localhost:{stack.mlflow_port}"
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    admin = ("admin", stack.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert requests.get(f"{mlflow}/health", verify=ca, timeout=10).status_code == 200
    assert requests.get(mlflow + search, verify=ca, auth=admin, timeout=10).status_code == 200
    assert requests.get(mlflow + search, verify=ca, timeout=10).status_code == 401
    for port in (stack.minio_port, stack.mlflow_port):  # no plain HTTP on either port
        try:
            plain = requests.get(f"http://localhost:{port}/", timeout=10).status_code
        except requests.ConnectionError:
            plain = None
        assert plain in (None, 400), port  # 400: Go's "HTTP request to an HTTPS server"
