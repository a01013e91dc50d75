"""The loop closed for real: moving `champion` in the MLflow registry (what the UI does)
reaches real edge agents through the webhook, a Celery worker and beat, signed releases
and chunked MQTT transfer — canaries first; a bad model stops at the canaries; a worker
killed mid-rollout; the fleet moved back to an older model by a new release."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

import pytest
from mlflow import MlflowClient
from sqlalchemy import select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.rollout.signing import init_fleet_trust
from cloud.store.db import Device, DeviceUpdate, Rollout, session_factory
from cloud.tracking.registry import Registry
from cloud.tracking.webhooks import delete_webhook
from shared.package import ModelPackage, model_name
from tests.conftest import (
    HOST,
    MQTT_PORT,
    REDIS_PORT,
    celery_env,
    require,
    wait_for,
    windows_of,
)
from tests.fleetkit import Feeder, package_variant, register_package

pytestmark = [pytest.mark.services, pytest.mark.slow]
PROFILE = "cpu-fp32"
SITES = ("north", "south")
DEVICES = 8  # canaries: the larger of 5 and 5%: five, then the other three
SECRET = "rollout-test-webhook-secret"


def _answers_http(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class LiveFleet:
    fleet: str
    sessions: object
    store: object
    client: MlflowClient
    agents: list
    versions: dict[str, str]  # edgeloop version → MLflow version
    sha: dict[str, str]  # edgeloop version → package sha256
    env: dict
    tmp: object
    procs: dict = field(default_factory=dict)

    def champion(self, version: str) -> None:
        """What an operator does in the MLflow UI: move `champion`."""
        self.client.set_registered_model_alias(
            model_name(self.fleet, PROFILE), "champion", self.versions[version]
        )

    def rollouts(self) -> list[Rollout]:
        with self.sessions() as s:
            return list(s.scalars(select(Rollout).where(Rollout.fleet == self.fleet)
                                  .order_by(Rollout.id)))  # fmt: skip

    def updates(self, rollout_id: int) -> dict[str, DeviceUpdate]:
        with self.sessions() as s:
            rows = s.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id))
            return {r.device_id: r for r in rows}

    def running(self) -> dict[str, str | None]:
        return {a.settings.device_id: a.model_version for a in self.agents}

    def celery(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "cloud.tasks", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def worker(self, name: str = "worker") -> subprocess.Popen:
        return self.celery(
            name, "worker", "-Q", f"q-{self.fleet}", "--pool", "threads", "--concurrency", "2",
            "--loglevel", "INFO", "--hostname", f"{name}-{self.fleet}@%h",
        )  # fmt: skip

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


def cloud_env(pg_url, store, mlflow_uri, fleet, keys) -> dict:
    """The settings every cloud process of this test runs with: its own database, bucket,
    Celery queue, Redis db, shared-subscription group and online keys."""
    return celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_MQTT_PORT=str(MQTT_PORT),
        EDGELOOP_TUF_KEYS_DIR=str(keys),
        EDGELOOP_ROLLOUT_TICK_S="1",
        EDGELOOP_ROLLOUT_RECONCILE_S="2",
        EDGELOOP_ROLLOUT_SHARED_GROUP=f"r{fleet}",  # chunks from this test's store only
        EDGELOOP_ROLLOUT_DWELL_HEARTBEATS="3",
        EDGELOOP_CELERY_VISIBILITY_TIMEOUT_S="10",
        MLFLOW_LOGGING_LEVEL="WARNING",
    )  # fmt: skip


def start_cloud(live: LiveFleet, mlflow_uri: str) -> None:
    """The receiver as operators run it (MLflow's signed webhook in, a Celery task out; it
    registers itself with the MLflow server), a Celery worker and beat."""
    port = _free_port()
    live.env.update(EDGELOOP_WEBHOOK_SECRET=SECRET, EDGELOOP_WEBHOOK_NAME=f"rollouts-{live.fleet}",
                    EDGELOOP_WEBHOOK_PORT=str(port))  # fmt: skip
    live.procs["webhook"] = subprocess.Popen(
        [sys.executable, "-c", "from shared.cli import main; main()", "cloud", "webhook"],
        env=live.env, stdout=(live.tmp / "webhook.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(lambda: _answers_http(f"http://{HOST}:{port}/healthz"), 30, what="the receiver")
    live.worker()
    live.celery("beat", "beat", "--loglevel", "INFO",
                "--schedule", str(live.tmp / "beat-schedule"))  # fmt: skip


def stop_cloud(live: LiveFleet, mlflow_uri: str) -> None:
    for proc in live.procs.values():
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    for proc in live.procs.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    delete_webhook(tracking_uri=mlflow_uri, name=f"rollouts-{live.fleet}")


@pytest.fixture
def live_fleet(pg_url, s3_store, mlflow_uri, fleet, tep_small, tiny_package, tmp_path):
    """Eight enrolled agents on two sites running v1, fed real normal windows; v2 (good),
    v3 (fails its smoke check) and v4 (calls normal windows faults) registered, no alias;
    the ingest, the webhook receiver, a Celery worker and beat running."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    require("Redis", REDIS_PORT)
    sessions = session_factory(pg_url)
    keys, offline = tmp_path / "keys", tmp_path / "offline"
    root = init_fleet_trust(store=s3_store, fleet=fleet, keys_dir=keys, offline_dir=offline)
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    pkg_v1, _ = tiny_package
    packages = {
        "v1": package_variant(tiny_package, "v1"),
        "v2": package_variant(tiny_package, "v2"),
        "v3": package_variant(tiny_package, "v3", nan=True),
        "v4": package_variant(tiny_package, "v4", rotate_classes=True),
    }
    versions = {
        v: register_package(
            sessions=sessions, store=s3_store, registry=registry, fleet=fleet, package=p
        )
        for v, p in packages.items()
    }
    with sessions() as s:
        for i in range(DEVICES):
            s.add(Device(id=f"{fleet}-d{i}", fleet=fleet, profile=PROFILE, site=SITES[i % 2],
                         model_version="v1"))  # fmt: skip
        s.commit()
    agents = []
    for i in range(DEVICES):
        agent = EdgeAgent(
            EdgeSettings(
                fleet=fleet, device_id=f"{fleet}-d{i}", profile=PROFILE, mqtt_port=MQTT_PORT,
                state_dir=tmp_path / f"d{i}", heartbeat_s=0.5, resend_after_s=1.0,
                upload_bytes_per_hour=2_000_000,
            )
        )  # fmt: skip
        agent.enroll(root)
        agent.bootstrap(packages["v1"])
        agent.start()
        agents.append(agent)
    wait_for(lambda: all(a.link.connected.is_set() for a in agents), 20, what="agents")
    train, _ = tep_small
    feeder = Feeder(agents, windows_of(train, "normal", 200)).start()
    ingest = IngestService(
        Ingestor(sessions=sessions, store=s3_store), host=HOST, port=MQTT_PORT, fleet=fleet,
        group=None,
    )  # fmt: skip
    ingest.start()
    env = cloud_env(pg_url, s3_store, mlflow_uri, fleet, keys)
    # Only the webhook starts these rollouts (the reconcile has its own test, below).
    env["EDGELOOP_ROLLOUT_RECONCILE_S"] = "600"
    live = LiveFleet(
        fleet, sessions, s3_store, MlflowClient(tracking_uri=mlflow_uri), agents, versions,
        {v: ModelPackage(p).sha256 for v, p in packages.items()}, env, tmp_path,
    )  # fmt: skip
    start_cloud(live, mlflow_uri)
    try:
        yield live
    finally:
        feeder.stop()
        stop_cloud(live, mlflow_uri)
        for a in agents:
            a.stop()
        ingest.stop()


def test_champion_moved_in_the_registry_reaches_canaries_first_then_everyone(live_fleet):
    """Moving `champion` to v2 starts a rollout through the signed webhook: five canaries
    spread over both sites install v2 first, the other three only after the canaries'
    dwell; every device ends on v2's exact bytes. Moving `champion` back to v1 is a new
    signed release (a higher release number) that takes the whole fleet back to v1."""
    f = live_fleet
    f.champion("v2")
    wait_for(lambda: set(f.running().values()) == {"v2"}, 180, what=f"v2 everywhere\n{f.logs()}")
    wait_for(lambda: f.rollouts() and f.rollouts()[-1].state == "done", 60, what="rollout done")
    first = f.rollouts()[-1]
    updates = f.updates(first.id)
    canaries, rest = first.plan[0], [d for wave in first.plan[1:] for d in wave]
    assert len(canaries) == 5 and len(rest) == 3
    with f.sessions() as s:
        assert {s.get(Device, d).site for d in canaries} == set(SITES)
    # No device outside the cohort was sent v2 before every canary had installed it.
    assert max(updates[d].installed_at for d in canaries) < min(updates[d].sent_at for d in rest)
    assert all(a.runtime.package.sha256 == f.sha["v2"] for a in f.agents)
    assert first.trigger == "alias" and first.target_version == "v2"
    # The rollout charted in MLflow: its run's step metrics, and the version tagged with it.
    wait_for(lambda: f.client.get_run(first.mlflow_run_id).info.status == "FINISHED", 30,
             what="the rollout's MLflow run to finish")  # fmt: skip
    on_target = f.client.get_metric_history(first.mlflow_run_id, "devices_on_target")
    assert on_target[-1].value == DEVICES and len(on_target) >= 2

    def version_tags():  # the run ends first, then the version is tagged
        mv = f.client.get_model_version(model_name(f.fleet, PROFILE), f.versions["v2"])
        return mv.tags.get("rollout_id"), mv.tags.get("rollout_state")

    wait_for(lambda: version_tags() == (str(first.id), "done"), 30,
             what=f"the version tagged with its rollout: {version_tags()}")  # fmt: skip

    f.champion("v1")
    wait_for(lambda: set(f.running().values()) == {"v1"}, 180, what=f"back to v1\n{f.logs()}")
    wait_for(lambda: f.rollouts()[-1].state == "done", 60, what="the rollback rollout done")
    back = f.rollouts()[-1]
    assert back.target_version == "v1" and back.release > first.release
    assert all(a.runtime.package.sha256 == f.sha["v1"] for a in f.agents)


@pytest.mark.parametrize(
    ("version", "why"),
    [("v3", "smoke_check_failed"), ("v4", "anomaly")],
    ids=["fails-its-smoke-check", "anomaly-rate-jumps"],
)
def test_a_bad_model_stops_at_the_canaries_and_they_roll_back(live_fleet, version, why):
    """A model whose canaries fail (its smoke check on the device, or an anomaly-rate jump
    the two-proportion test flags) aborts the rollout at the canary wave; the canaries are
    back on v1 through a new signed release; no device outside the cohort ever ran it."""
    f = live_fleet
    seen: dict[str, set] = {a.settings.device_id: set() for a in f.agents}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for device, running in f.running().items():
                seen[device].add(running)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        f.champion(version)
        wait_for(lambda: f.rollouts() and f.rollouts()[-1].state == "aborted", 240,
                 what=f"the rollout to abort\n{f.logs()}")  # fmt: skip
        wait_for(lambda: set(f.running().values()) == {"v1"}, 120, what="canaries back on v1")
    finally:
        stop.set()
        watcher.join(5)
    rollout = f.rollouts()[-1]
    canaries = set(rollout.plan[0])
    assert why in rollout.reason, rollout.reason
    assert all(version not in seen[d] for d in seen if d not in canaries), seen
    updates = f.updates(rollout.id)
    assert {updates[d].state for d in canaries} <= {"rolled_back", "failed"}
    assert all(updates[d].state == "pending" for d in updates if d not in canaries)


def test_a_worker_killed_mid_rollout_resumes_and_finishes_once(live_fleet):
    """SIGKILL the worker while the canaries dwell: a new worker picks the rollout up from
    its rows and finishes it, once — one rollout, every device on v2, one install each."""
    f = live_fleet
    f.champion("v2")
    wait_for(lambda: f.rollouts() and f.rollouts()[-1].state not in ("pending",), 120,
             what="the canary wave to start")  # fmt: skip
    rollout_id = f.rollouts()[-1].id
    wait_for(lambda: any(u.state == "installed" for u in f.updates(rollout_id).values()), 120,
             what="a canary install")  # fmt: skip
    f.procs["worker"].kill()
    f.procs["worker"].wait(10)
    f.worker("worker2")
    wait_for(lambda: set(f.running().values()) == {"v2"}, 240, what=f"v2 everywhere\n{f.logs()}")
    wait_for(lambda: f.rollouts()[-1].state == "done", 60, what="rollout done")
    assert [r.id for r in f.rollouts()] == [rollout_id]
    applied = [e for a in f.agents for e in a.update_events if e.status == "applied"]
    assert sorted(e.device_id for e in applied) == sorted(a.settings.device_id for a in f.agents)


def test_cloud_init_brings_a_fresh_fleet_to_a_rolled_out_first_model(
    pg_url, s3_store, mlflow_uri, fleet, tep_small, tmp_path
):
    """On a fresh database and an empty registry: `edgeloop cloud init` trains, registers
    and promotes v1 (its champion move reaches the webhook: a rollout of no device yet);
    three devices enrolled with `edgeloop fleet enroll` start with no model, only the
    fleet's root; the reconcile sends them v1 in a signed rollout of their own."""
    import numpy as np

    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings
    from sim.tep import generate
    from tests.conftest import TEP_CACHE

    require("Redis", REDIS_PORT)
    train, golden = tep_small
    validation = generate(classes=train.class_names, runs_per_class=1, seed=41, horizon_h=4.0,
                          cache_dir=TEP_CACHE, workers=2)  # fmt: skip
    files = {}
    for role, w in (("base", train), ("validation", validation), ("golden", golden)):
        files[role] = tmp_path / f"{role}.npz"
        np.savez(files[role], x=w.x, y=w.y, class_names=np.array(w.class_names))
    sessions = session_factory(pg_url)
    env = cloud_env(pg_url, s3_store, mlflow_uri, fleet, tmp_path / "keys")
    env["EDGELOOP_ROUND_EPOCHS"] = "6"
    live = LiveFleet(fleet, sessions, s3_store, MlflowClient(tracking_uri=mlflow_uri), [], {},
                     {}, env, tmp_path)  # fmt: skip

    def edgeloop(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", "from shared.cli import main; main()", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    start_cloud(live, mlflow_uri)
    agents = []
    try:
        sets = [a for role, path in files.items() for a in (f"--{role}", str(path))]
        edgeloop("cloud", "init", "--fleet", fleet, "--profile", PROFILE,
                 "--offline-keys", str(tmp_path / "offline"), *sets)  # fmt: skip
        wait_for(lambda: live.rollouts() and live.rollouts()[0].state == "done", 60,
                 what=f"the first champion's rollout\n{live.logs()}")  # fmt: skip
        for i in range(3):
            edgeloop("fleet", "enroll", f"{fleet}-d{i}", "--fleet", fleet, "--profile", PROFILE,
                     "--site", SITES[i % 2], "--out", str(tmp_path / f"enroll{i}"))  # fmt: skip
            agent = EdgeAgent(
                EdgeSettings(
                    fleet=fleet, device_id=f"{fleet}-d{i}", profile=PROFILE,
                    mqtt_port=MQTT_PORT, state_dir=tmp_path / f"d{i}", heartbeat_s=0.5,
                )
            )  # fmt: skip
            agent.enroll((tmp_path / f"enroll{i}" / "root.json").read_bytes())
            assert agent.runtime is None  # no factory image: the fleet sends the first model
            agent.start()
            agents.append(agent)
        ingest = IngestService(
            Ingestor(sessions=sessions, store=s3_store), host=HOST, port=MQTT_PORT,
            fleet=fleet, group=None,
        )  # fmt: skip
        ingest.start()
        feeder = Feeder(agents, windows_of(train, "normal", 50)).start()
        try:
            wait_for(lambda: all(a.model_version == "v1" for a in agents), 180,
                     what=f"v1 on the new devices\n{live.logs()}")  # fmt: skip
            wait_for(lambda: all(r.state == "done" for r in live.rollouts()), 60,
                     what="the newcomers' rollouts")  # fmt: skip
        finally:
            feeder.stop()
            ingest.stop()
    finally:
        stop_cloud(live, mlflow_uri)
        for a in agents:
            a.stop()
    champion = live.client.get_model_version_by_alias(model_name(fleet, PROFILE), "champion")
    assert all(a.runtime.package.sha256 == champion.tags["sha256"] for a in agents)
    # Devices enrolled one by one while a newcomers' rollout runs join the next one.
    first, *newcomers = live.rollouts()
    # The webhook's task and the reconcile race for the first champion: either starts it.
    assert first.trigger in ("alias", "reconcile") and first.plan == []
    assert newcomers and {(r.trigger, r.target_version) for r in newcomers} == {("enrolled", "v1")}
    planned = [d for r in newcomers for wave in r.plan for d in wave]
    assert sorted(set(planned)) == sorted(a.settings.device_id for a in agents)
