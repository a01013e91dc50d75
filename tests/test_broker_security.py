"""The production broker as deploy/ configures it (TLS, dynamic-security roles, per-device
credentials bound to client ids), started by `scripts/services up --production` on a spare
port: what a device, an outsider and each cloud role can and cannot do."""

from __future__ import annotations

import ssl
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
import typer
from sqlalchemy import select
from typer.testing import CliRunner

from cloud.commands.broker import revoke_cmd
from cloud.config import CloudSettings, get_settings
from cloud.ingest.ingestor import Ingestor
from cloud.rollout.identity import BrokerAdmin, DeviceCredentials
from cloud.store.db import DeadLetter, Device, session_factory
from cloud.store.objects import LocalObjectStore
from cloud.store.records import is_revoked, register_device
from edge_agent.config import EdgeSettings
from shared.errors import ConfigError
from shared.messages import MAX_UPDATE_MESSAGE_BYTES, Heartbeat
from shared.mqtt import device_client_id
from shared.topics import UPLINK_KINDS, topic

from .conftest import use_cloud, wait_for
from .production import Client, ProductionBroker, granted, spare_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """The production broker, once per session (its own state folder and port)."""
    running = ProductionBroker(tmp_path_factory.mktemp("prod-broker"), spare_port()).start()
    yield running
    running.stop()


@pytest.fixture
def creds(broker, fleet) -> dict[str, DeviceCredentials]:
    """Devices a and b of this test's fleet, with credentials issued over $CONTROL."""
    with BrokerAdmin(broker.options("admin")) as admin:
        return {d: admin.issue(fleet, d) for d in ("a", "b")}


@pytest.fixture
def clients():
    """Clients a test starts, stopped after it."""
    made: list[Client] = []

    def start(options, **kw) -> Client:
        c = Client(options, **kw).start()
        made.append(c)
        c.connack.wait(10)
        return c

    yield start
    for c in made:
        c.stop()


def as_device(broker, clients, cred: DeviceCredentials, *, client_id: str | None = None):
    return clients(
        broker.options(cred.username, cred.password),
        client_id=client_id or cred.client_id,
        clean_session=False,
    )


def marker_seen(watcher: Client, marker: bytes) -> bool:
    return any(p == marker for _, p in watcher.messages)


def test_a_device_cannot_publish_into_another_devices_topics(broker, creds, clients, fleet):
    """A's messages on B's samples, labels, heartbeat and update-status never reach the
    ingest role (which reads every device's uploads); A's own samples do."""
    ingest = clients(broker.options("ingest"))
    for kind in UPLINK_KINDS:
        assert granted(ingest.subscribe(f"$share/t{fleet}/edgeloop/v1/{fleet}/+/{kind}"))
    assert not granted(ingest.subscribe(f"edgeloop/v1/{fleet}/+/+"))  # acks and updates too
    a = as_device(broker, clients, creds["a"])
    assert a.connected.is_set(), a.refused
    for kind in ("samples", "labels", "heartbeat", "update-status"):
        a.publish(topic(fleet, "b", kind), b"forged by a")
    marker = uuid.uuid4().hex.encode()
    assert a.publish(topic(fleet, "a", "samples"), marker)
    wait_for(lambda: marker_seen(ingest, marker), 10, what="a's own sample at ingest")
    assert [t for t, _ in ingest.messages] == [topic(fleet, "a", "samples")]


def test_a_device_cannot_read_another_devices_updates(broker, creds, clients, fleet):
    """A's subscriptions to B's updates and acks, or to every device's, are refused; an
    update the rollout role sends B reaches B and not A."""
    a = as_device(broker, clients, creds["a"])
    b = as_device(broker, clients, creds["b"])
    for t in (
        topic(fleet, "b", "updates"),
        topic(fleet, "b", "acks"),
        f"edgeloop/v1/{fleet}/+/updates",
        f"$share/a/edgeloop/v1/{fleet}/b/updates",  # a shared subscription is no way round
        f"$share/a/edgeloop/v1/{fleet}/+/samples",
        "#",
    ):
        assert not granted(a.subscribe(t)), t
    assert granted(b.subscribe(topic(fleet, "b", "updates")))
    rollout = clients(broker.options("rollout"))
    marker = uuid.uuid4().hex.encode()
    assert rollout.publish(topic(fleet, "b", "updates"), marker)
    wait_for(lambda: marker_seen(b, marker), 10, what="b's update")
    time.sleep(0.3)
    assert a.messages == []


def test_a_device_cannot_take_over_another_devices_session(broker, creds, clients, fleet):
    """A connecting with B's client id (A's credentials) is refused; B stays connected and
    its persistent session keeps receiving its updates."""
    b = as_device(broker, clients, creds["b"])
    assert granted(b.subscribe(topic(fleet, "b", "updates")))
    thief = as_device(broker, clients, creds["a"], client_id=creds["b"].client_id)
    assert thief.refused is not None and not thief.connected.is_set()
    assert "not authori" in thief.refused.lower()
    marker = uuid.uuid4().hex.encode()
    assert clients(broker.options("rollout")).publish(topic(fleet, "b", "updates"), marker)
    wait_for(lambda: marker_seen(b, marker), 10, what="b's update after the attempt")
    assert b.connected.is_set() and not b.disconnected.is_set()


@pytest.fixture
def revoke(monkeypatch, broker, pg_url):
    """`edgeloop fleet revoke` in this process, on this test's database and broker."""
    for key, value in {
        "EDGELOOP_DATABASE_URL": pg_url,
        "EDGELOOP_MQTT_HOST": "localhost",
        "EDGELOOP_MQTT_PORT": str(broker.port),
        "EDGELOOP_MQTT_TLS": "true",
        "EDGELOOP_MQTT_CA_FILE": str(broker.ca_file),
        "EDGELOOP_MQTT_ADMIN_USERNAME": "admin",
        "EDGELOOP_MQTT_ADMIN_PASSWORD": broker.passwords["admin"],
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    app = typer.Typer()
    app.command("revoke")(revoke_cmd)
    app.command("unused")(lambda: None)  # two commands: `revoke` stays a subcommand
    yield lambda device: CliRunner().invoke(app, ["revoke", device])
    get_settings.cache_clear()


def test_revoke_disconnects_the_device_at_once_and_refuses_it(
    broker, creds, clients, fleet, pg_url, revoke, tmp_path
):
    """After `fleet revoke a`: a is disconnected within a second, cannot reconnect (so
    cannot publish), is marked revoked for ingest; b is untouched."""
    sessions = session_factory(pg_url)
    with sessions() as s:
        for d in ("a", "b"):
            register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
    a = as_device(broker, clients, creds["a"])
    b = as_device(broker, clients, creds["b"])
    assert a.connected.is_set() and b.connected.is_set()
    t0 = time.monotonic()
    result = revoke("a")
    assert result.exit_code == 0, result.output
    wait_for(a.disconnected.is_set, 5, what="a disconnected")
    assert time.monotonic() - t0 < 5
    again = as_device(broker, clients, creds["a"])
    assert again.refused is not None and not again.connected.is_set()
    assert not a.publish(topic(fleet, "a", "samples"), b"after revocation", timeout=1)
    with sessions() as s:
        assert is_revoked(s, "a") and not is_revoked(s, "b")
    assert b.connected.is_set() and not b.disconnected.is_set()
    # What a queued before its revocation reaches ingest: dead-lettered as revoked; b's
    # is taken.
    ingestor = Ingestor(sessions=sessions, store=LocalObjectStore(tmp_path / "objects"))
    for d in ("a", "b"):
        beat = Heartbeat(
            fleet=fleet,
            device_id=d,
            model_version=None,
            profile="cpu-fp32",
            buffer_depth=0,
            windows_seen=0,
            anomaly_rate=0.0,
            latency_ms_p50=0.0,
        )
        ingestor.handle_batch([(topic(fleet, d, "heartbeat"), beat.encode())])
    ingestor.close()
    with sessions() as s:
        letters = [(x.device_id, x.reason) for x in s.scalars(select(DeadLetter))]
        assert letters == [("a", "device_revoked")]
        assert s.get(Device, "b").last_seen is not None and s.get(Device, "a").last_seen is None


def raw_connect(port: int, *, tls_ca=None, username=None, password=None) -> list[str]:
    """Connect with a bare paho client (no settings checks): the CONNACK reasons seen."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex}")
    if tls_ca:
        client.tls_set_context(ssl.create_default_context(cafile=str(tls_ca)))
    if username:
        client.username_pw_set(username, password)
    seen: list[str] = []
    client.on_connect = lambda c, u, f, rc, p: seen.append(str(rc))
    try:
        client.connect("localhost", port, keepalive=5)
        deadline = time.monotonic() + 3
        while not seen and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                break  # the broker closed the connection
    except (OSError, ssl.SSLError):
        pass
    finally:
        client.disconnect()
    return seen


def test_outsiders_cannot_connect(broker, creds):
    """Over TLS without credentials or with a wrong password the broker refuses; plain
    MQTT on the TLS port gets no answer at all; the right login is accepted."""
    ca = broker.ca_file
    assert raw_connect(broker.port, tls_ca=ca) == ["Not authorized"]
    wrong = raw_connect(broker.port, tls_ca=ca, username=creds["a"].username, password="no")
    assert wrong == ["Not authorized"]
    assert raw_connect(broker.port, username="ingest", password=broker.passwords["ingest"]) == []
    assert raw_connect(
        broker.port, tls_ca=ca, username="ingest", password=broker.passwords["ingest"]
    ) == ["Success"]


def test_cloud_roles_do_only_their_part(broker, creds, clients, fleet):
    """Ingest may not publish updates; rollout may not read samples (neither subscribe to
    them nor receive them through a wider filter)."""
    b = as_device(broker, clients, creds["b"])
    assert granted(b.subscribe(topic(fleet, "b", "updates")))
    ingest = clients(broker.options("ingest"))
    ingest.publish(topic(fleet, "b", "updates"), b"forged offer by ingest")
    rollout = clients(broker.options("rollout"))
    for t in (f"edgeloop/v1/{fleet}/+/samples", f"$share/r{fleet}/edgeloop/v1/+/+/samples", "#"):
        assert not granted(rollout.subscribe(t)), t
    assert granted(rollout.subscribe(f"edgeloop/v1/{fleet}/+/update-status"))
    a = as_device(broker, clients, creds["a"])
    assert a.publish(topic(fleet, "a", "samples"), b"a sample")
    marker = uuid.uuid4().hex.encode()
    assert rollout.publish(topic(fleet, "b", "updates"), marker)
    assert a.publish(topic(fleet, "a", "update-status"), marker)
    wait_for(
        lambda: marker_seen(b, marker) and marker_seen(rollout, marker),
        10,
        what="rollout's update and a's status",
    )
    assert [p for _, p in b.messages] == [marker]
    assert [t for t, _ in rollout.messages] == [topic(fleet, "a", "update-status")]


def test_health_check_passes_with_only_what_its_role_grants(broker, clients):
    """deploy/mosquitto/healthcheck passes; the health role reads nothing else."""
    result = broker.healthcheck()
    assert result.returncode == 0, result.stderr
    health = clients(broker.options("health"))
    for t in ("$SYS/#", "edgeloop/v1/#", "#"):
        assert not granted(health.subscribe(t)), t


def test_packets_over_max_packet_size_are_refused(broker, creds, clients, fleet):
    """An update-sized message passes; one past max_packet_size gets its sender cut off."""
    b = as_device(broker, clients, creds["b"])
    assert granted(b.subscribe(topic(fleet, "b", "updates")))
    rollout = clients(broker.options("rollout"))
    assert rollout.publish(topic(fleet, "b", "updates"), b"x" * MAX_UPDATE_MESSAGE_BYTES, 30)
    wait_for(lambda: len(b.messages) == 1, 30, what="the largest update message")
    rollout.publish(topic(fleet, "b", "updates"), b"x" * (MAX_UPDATE_MESSAGE_BYTES + 8192), 1)
    wait_for(rollout.disconnected.is_set, 10, what="the oversize sender disconnected")
    assert len(b.messages) == 1


def test_unsafe_mqtt_settings_are_refused(tmp_path):
    """Production refuses TLS off, TLS without a CA, and no credentials; any mode refuses
    TLS without a username (on the edge and in the cloud)."""
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    ok = dict(mqtt_tls=True, mqtt_ca_file=ca, mqtt_username="f/d", mqtt_password="pw-123456")
    EdgeSettings(mode="production", **ok)
    for broken, says in (
        ({"mqtt_tls": False}, "MQTT_TLS must be true"),
        ({"mqtt_ca_file": None}, "MQTT_CA_FILE"),
        ({"mqtt_password": None}, "MQTT_PASSWORD"),
        ({"mqtt_ca_file": tmp_path / "missing.crt"}, "does not exist"),
    ):
        with pytest.raises(ConfigError, match=says):
            EdgeSettings(mode="production", **{**ok, **broken})
    with pytest.raises(ConfigError, match="MQTT_USERNAME"):
        EdgeSettings(mqtt_tls=True)
    with pytest.raises(ConfigError, match="EDGELOOP_MQTT_CA_FILE"):
        CloudSettings(
            mode="production", mqtt_tls=True, mqtt_username="ingest", mqtt_password="a-real-secret"
        )
    assert (
        EdgeSettings(mode="production", **{**ok, "mqtt_ca_file": None}, mqtt_system_ca=True)
        .mqtt_options()
        .tls
    )


@pytest.fixture
def enrolling(monkeypatch, broker, pg_url, s3_store, fleet, tmp_path):
    """A fleet as `cloud init` leaves it, and `edgeloop fleet enroll` against the
    production broker (admin identity, CA) on this test's database and bucket."""
    from cloud.commands.fleet import enroll_cmd
    from cloud.rollout.signing import init_fleet_trust
    from cloud.store.db import ModelVersion
    from cloud.store.records import create_fleet
    from shared.package import model_name

    sessions = session_factory(pg_url)
    with sessions() as s:
        create_fleet(session=s, fleet=fleet, classes=["normal", "idv_01", "idv_02", "idv_07"])
        s.add(
            ModelVersion(
                name=model_name(fleet, "cpu-fp32"), version="v1", mlflow_version="1",
                profile="cpu-fp32", sha256="0" * 64, parent=None,
                object_key=f"packages/{fleet}/cpu-fp32/v1.edgepkg",
                class_names=["normal"], gates={"passed": True},
            )
        )  # fmt: skip
        s.commit()
    init_fleet_trust(
        store=s3_store, fleet=fleet, keys_dir=tmp_path / "online", offline_dir=tmp_path / "off"
    )
    use_cloud(
        monkeypatch, pg_url, s3_store,
        EDGELOOP_MQTT_HOST="localhost", EDGELOOP_MQTT_PORT=str(broker.port),
        EDGELOOP_MQTT_TLS="true", EDGELOOP_MQTT_CA_FILE=str(broker.ca_file),
        EDGELOOP_MQTT_ADMIN_USERNAME="admin",
        EDGELOOP_MQTT_ADMIN_PASSWORD=broker.passwords["admin"],
    )  # fmt: skip
    app = typer.Typer()
    app.command("enroll")(enroll_cmd)
    app.command("unused")(lambda: None)
    yield sessions, lambda *args: CliRunner().invoke(app, ["enroll", *args])
    get_settings.cache_clear()


def test_enrolled_agent_uploads_over_tls_with_its_own_credentials(
    broker, enrolling, fleet, s3_store, tiny_package, tep_small, tmp_path
):
    """`fleet enroll` issues d1's login (mqtt.env, 0600; in the database only the username
    and date); a real edge agent started from it uploads over TLS to a real ingest running
    as the ingest role, every selected sample is stored and acked back to the device."""
    import numpy as np
    from sqlalchemy import func, select

    from cloud.ingest.ingestor import Ingestor
    from cloud.ingest.service import IngestService
    from cloud.store.db import Device, Sample

    from .conftest import make_agent, windows_of

    sessions, enroll = enrolling
    out = tmp_path / "enroll-d1"
    result = enroll("d1", "--fleet", fleet, "--profile", "cpu-fp32", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "mqtt.env").stat().st_mode & 0o777 == 0o600
    login = dict(line.split("=", 1) for line in (out / "mqtt.env").read_text().splitlines())
    identity = (out / "device.json").read_text()
    assert login["EDGELOOP_EDGE_MQTT_PASSWORD"] not in identity
    # The byte budget ingest's quota is made from (no fleet row here: the cloud's default).
    budget = CloudSettings(_env_file=None).ingest_upload_bytes_per_hour
    assert login["EDGELOOP_EDGE_UPLOAD_BYTES_PER_HOUR"] == str(budget)
    with sessions() as s:
        row = s.get(Device, "d1")
        assert row.broker_username == f"{fleet}/d1" and row.credentials_issued_at is not None
        assert login["EDGELOOP_EDGE_MQTT_PASSWORD"] not in repr(
            [getattr(row, c.key) for c in Device.__table__.columns]
        )
    ingest = IngestService(
        Ingestor(sessions=sessions, store=s3_store),
        host="unused",
        port=0,
        options=broker.options("ingest"),
        fleet=fleet,
        group=f"g{fleet}",
    )
    ingest.start()
    agent = None
    try:
        assert ingest.ready.wait(10)
        agent = make_agent(
            tmp_path, fleet, int(login["EDGELOOP_EDGE_MQTT_PORT"]), tiny_package[0],
            device=login["EDGELOOP_EDGE_DEVICE_ID"],
            mqtt_host=login["EDGELOOP_EDGE_MQTT_HOST"],
            mqtt_tls=login["EDGELOOP_EDGE_MQTT_TLS"] == "true",
            mqtt_ca_file=out / login["EDGELOOP_EDGE_MQTT_CA_FILE"],
            mqtt_username=login["EDGELOOP_EDGE_MQTT_USERNAME"],
            mqtt_password=login["EDGELOOP_EDGE_MQTT_PASSWORD"],
        )  # fmt: skip
        _, golden = tep_small
        faulty = np.concatenate([windows_of(golden, c, 4) for c in ("idv_01", "idv_07")])
        selected = [m for w in faulty if (m := agent.process(w)[1])]
        assert selected
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "acks over TLS")
        with sessions() as s:
            stored = s.scalar(
                select(func.count()).select_from(Sample).where(Sample.device_id == "d1")
            )
        assert stored == len(selected)
    finally:
        if agent is not None:
            agent.stop()
        ingest.stop()


def test_device_client_ids_never_collide():
    """Names may hold '-': fleet plant-a's device 01 and fleet plant's device a-01 are two
    sessions, never one that each takes from the other."""
    assert device_client_id("plant-a", "01") != device_client_id("plant", "a-01")
