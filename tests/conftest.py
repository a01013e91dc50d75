"""Shared fixtures: the real services (started by scripts/services), one namespace per test."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, settings

HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("EDGELOOP_POSTGRES_PORT", 5432))
REDIS_PORT = int(os.environ.get("EDGELOOP_REDIS_PORT", 6379))
MQTT_PORT = int(os.environ.get("EDGELOOP_MOSQUITTO_PORT", 1883))
S3_PORT = int(os.environ.get("EDGELOOP_SEAWEEDFS_PORT", 8333))
MLFLOW_PORT = int(os.environ.get("EDGELOOP_MLFLOW_PORT", 5000))
S3_KEY = os.environ.get("EDGELOOP_S3_ACCESS_KEY", "edgeloop")
S3_SECRET = os.environ.get("EDGELOOP_S3_SECRET_KEY", "edgeloop-dev-secret")
ROOT = Path(__file__).resolve().parent.parent
# Simulated TEP episodes are deterministic: cache them across tests and runs.
TEP_CACHE = Path(os.environ.get("EDGELOOP_TEST_CACHE", ROOT / ".edgeloop" / "test-cache"))


# --- Hypothesis profiles (issue 15) -------------------------------------------------------
# Fuzz tests carry no max_examples of their own: they follow the profile chosen by
# HYPOTHESIS_PROFILE (or pytest's --hypothesis-profile, which wins). `ci`, the default, is a
# few hundred examples derived from a fixed seed, so a CI run is repeatable; `full` is
# thousands, random each run, for a search before a release:
#   HYPOTHESIS_PROFILE=full scripts/test -k fuzz
# A test whose every example is slow (a real package, a service round trip) scales the
# profile down with `scaled_examples(divisor)` and says why next to it.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci", max_examples=300, deadline=None, derandomize=True, suppress_health_check=_FUZZ_HEALTH
)
settings.register_profile(
    "full", max_examples=5000, deadline=None, suppress_health_check=_FUZZ_HEALTH
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled_examples(divisor: int) -> int:
    """The loaded profile's example count divided by ``divisor`` (at least 10): for a test
    that costs many times a plain decode per example. Read at import, after any
    --hypothesis-profile was applied."""
    return max(10, settings.default.max_examples // divisor)


# --- end of the Hypothesis profiles ---------------------------------------------------------


# -- chaos suite (tests/chaos) ------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption(
        "--chaos-full",
        action="store_true",
        help="tests/chaos: more devices, every fault several times, longer uploads (the "
        "benchmark run; CI runs each fault once)",
    )


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str, port: int) -> None:
    if not _answers(port):
        pytest.fail(
            f"{name} is not answering on {HOST}:{port}; start the services with "
            "`scripts/services up` (or run the whole suite with `scripts/test`)",
            pytrace=False,
        )


def use_cloud(monkeypatch, pg_url: str, s3_store, **more: str) -> None:
    """This process's cloud settings (`edgeloop …` commands run in it, the cached settings
    dropped) on this test's database and bucket, plus ``more`` (EDGELOOP_* name → value)."""
    from cloud.config import get_settings

    for key, value in {
        "EDGELOOP_DATABASE_URL": pg_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": f"{HOST}:{S3_PORT}",
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": s3_store.bucket,
        **more,
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for this test, at the newest schema, dropped after it."""
    from cloud.store.db import migrate

    require("PostgreSQL", PG_PORT)
    name = unique("edgeloop_t_")
    admin = f"postgresql://postgres@{HOST}:{PG_PORT}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@{HOST}:{PG_PORT}/{name}"
    migrate(url)  # as a service does at its start: sessions never migrate by themselves
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def s3_store():
    """An S3ObjectStore on SeaweedFS with a bucket of its own."""
    from cloud.store.objects import S3ObjectStore

    require("SeaweedFS S3", S3_PORT)
    store = S3ObjectStore(
        endpoint=f"{HOST}:{S3_PORT}", access_key=S3_KEY, secret_key=S3_SECRET, bucket=unique("t-")
    )
    yield store
    for key in store.list():
        store.delete(key)
    store.client.remove_bucket(store.bucket)


@pytest.fixture
def mqtt_port():
    require("Mosquitto", MQTT_PORT)
    return MQTT_PORT


@pytest.fixture
def mlflow_uri():
    require("MLflow server", MLFLOW_PORT)
    return f"http://{HOST}:{MLFLOW_PORT}"


@pytest.fixture
def fleet():
    """A fleet name of its own: topics, model names and experiments do not cross tests."""
    return unique("f")


@pytest.fixture(scope="session")
def tep_small():
    """A small real TEP data set: normal and three faults, train and golden splits."""
    from sim.tep import WindowSpec, generate, golden_set

    classes = ["normal", "idv_01", "idv_02", "idv_07"]
    spec = WindowSpec()
    train = generate(
        classes=classes,
        runs_per_class=2,
        seed=0,
        horizon_h=4.0,
        spec=spec,
        cache_dir=TEP_CACHE,
        workers=2,
    )
    golden = golden_set(classes=classes, horizon_h=4.0, spec=spec, cache_dir=TEP_CACHE, workers=2)
    return train, golden


@pytest.fixture(scope="session")
def tiny_package(tep_small):
    """A trained, packaged model (bytes) and its torch twin, for edge and ingest tests."""
    from cloud.model.cnn import ModelConfig, build_model
    from cloud.model.configs import TrainConfig
    from cloud.model.export import package_model
    from cloud.model.train import train

    data, _ = tep_small
    model = build_model(ModelConfig(n_classes=len(data.class_names)), data.x[data.y == 0])
    train(model, data.x, data.y, TrainConfig(epochs=15))
    from cloud.model.ood import ood_calibration

    pkg = package_model(
        model,
        name="edgeloop.test.cpu-fp32",
        version="v1",
        parent=None,
        profile="cpu-fp32",
        class_names=data.class_names,
        ood=ood_calibration(data.x[data.y == 0]),
    )
    return pkg, model


def windows_of(data, label: str, n: int) -> np.ndarray:
    idx = np.flatnonzero(np.array(data.class_names)[data.y] == label)[:n]
    return data.x[idx]


class SpareBroker:
    """A Mosquitto of the test's own on a free port, which the test may stop and restart."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            "persistence false",
            "max_queued_messages 100000",
        ]  # the default, 1000, drops the rest
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None

    def start(self) -> SpareBroker:
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("spare mosquitto did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def spare_broker(tmp_path):
    broker = SpareBroker(tmp_path).start()
    yield broker
    broker.stop()


def sample_message(fleet: str, window: np.ndarray, **fields):
    """A valid sample as a device sends it; ``fields`` override the defaults."""
    from shared.messages import SampleMessage, Tensor, utcnow

    base = dict(
        fleet=fleet,
        device_id="d1",
        window=Tensor.from_array(window),
        channels=window.shape[1],
        captured_at=utcnow(),
        model_version="v1",
        predicted="normal",
        confidence=0.5,
        score=0.0,
    )
    return SampleMessage(**{**base, **fields})


def repackage(tiny_package, version: str, *, profile: str = "cpu-fp32") -> bytes:
    """The fixture's model packaged again under another version (or profile), parent v1."""
    from cloud.model.export import package_model
    from shared.package import ModelPackage

    pkg, model = tiny_package
    m = ModelPackage(pkg).manifest
    return package_model(
        model,
        name=m.name,
        version=version,
        parent="v1",
        profile=profile,
        class_names=list(m.class_names),
        ood=m.metadata["ood"],
    )


def make_agent(tmp_path, fleet, mqtt_port, package, device="d1", **kw):
    """A connected edge agent with v1 installed; every selected window is uploaded."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    settings = {"resend_after_s": 0.5, "diversity_distance": 0.0, **kw}
    agent = EdgeAgent(
        EdgeSettings(
            fleet=fleet,
            device_id=device,
            mqtt_port=mqtt_port,
            state_dir=tmp_path / device,
            **settings,
        )
    )
    agent.bootstrap(package)
    agent.start()
    wait_for(agent.link.connected.is_set, 10, what="agent connection")
    return agent


def celery_env(pg_url, store, mlflow_uri, fleet, **extra) -> dict:
    """The environment of a test's own cloud processes (Celery worker and beat, commands):
    its database, bucket, tracking server, a Redis db of the tests' and its own queue."""
    return {
        **os.environ,
        "EDGELOOP_DATABASE_URL": pg_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": f"{HOST}:{S3_PORT}",
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": store.bucket,
        "EDGELOOP_MLFLOW_TRACKING_URI": mlflow_uri,
        "EDGELOOP_REDIS_URL": f"redis://{HOST}:{REDIS_PORT}/15",
        "EDGELOOP_CELERY_QUEUE": f"q-{fleet}",  # this test's own queue
        **extra,
    }


def healthz(port: int) -> dict:
    """What an ingest's /healthz on ``port`` says (``edgeloop cloud ingest --health-port``)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as resp:
        return json.loads(resp.read())


def ingest_connected(port: int) -> bool:
    """Whether the ingest serving /healthz on ``port`` is up and subscribed at its broker
    (the broker confirmed the subscription: it hands the ingest its share from now on)."""
    try:
        return bool(healthz(port)["subscribed"])
    except OSError:
        return False


def wait_for(predicate, timeout=30.0, tick=None, what="condition"):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if tick:
            tick()
        time.sleep(0.05)
