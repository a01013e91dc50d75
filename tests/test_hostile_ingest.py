"""Hostile input at ingest: label sources, names, the fleet's window shape, quotas answered
with retry (and an agent that loses nothing), outages never acked as rejected, capped dead
letters, and the liveness endpoint (a poison message across restarts:
test_departed_ingest)."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import psycopg
import pytest
from sqlalchemy import func, select

from cloud.ingest.health import serve_health
from cloud.ingest.ingestor import Ingestor
from cloud.ingest.limits import IngestLimits
from cloud.ingest.outages import TRANSIENT
from cloud.ingest.service import IngestService
from cloud.store.db import DeadLetter, Label, ModelVersion, Sample, session_factory
from cloud.store.objects import LocalObjectStore, S3ObjectStore
from cloud.store.records import create_fleet, register_device
from shared.messages import Ack, LabelMessage, decode
from shared.topics import topic

from .conftest import (
    HOST,
    PG_PORT,
    S3_KEY,
    S3_PORT,
    S3_SECRET,
    make_agent,
    sample_message,
    wait_for,
    windows_of,
)
from .proxy import TcpProxy

POISON = b"[" * 3000


def _registered(pg_url, fleet, *devices, classes=None, settings=None):
    sessions = session_factory(pg_url)
    with sessions() as s:
        if classes is not None or settings is not None:
            create_fleet(session=s, fleet=fleet, classes=classes or [], settings=settings)
        for d in devices:
            register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
    return sessions


def _count(sessions, model, *where) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _window(value: float = 0.0, shape=(32, 53), dtype="float32") -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


class AckListener:
    """A device-side view of the acks topic: every Ack the cloud publishes to ``device``."""

    def __init__(self, port: int, fleet: str, device: str) -> None:
        self.acks: list[Ack] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"l-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = lambda c, u, m: self.acks.append(decode("acks", m.payload))
        self.client.connect(HOST, port)
        self.client.subscribe(topic(fleet, device, "acks"), qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def publish(self, topic_name: str, payload: bytes) -> None:
        self.client.publish(topic_name, payload, qos=1).wait_for_publish(10)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_device_labels_only_as_device_and_names_hold_no_control_characters(
    pg_url, s3_store, fleet
):
    """A device's operator (or teacher) label is refused (bad_source) and stores nothing;
    a class name, a label or a model version with a right-to-left override, a zero-width
    space or an escape is refused (bad_name); the same label as source device is stored."""
    sessions = _registered(pg_url, fleet, "d1", classes=["normal", "idv_01"])
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    mine = sample_message(fleet, _window(1))
    assert ingestor.handle(topic(fleet, "d1", "samples"), mine.encode()).status == "stored"
    labels = topic(fleet, "d1", "labels")
    for source in ("operator", "teacher"):
        msg = LabelMessage(
            fleet=fleet,
            device_id="d1",
            sample_ids=(mine.message_id,),
            label="idv_01",
            source=source,
        )
        ack = ingestor.handle(labels, msg.encode())
        assert (ack.status, ack.reason) == ("rejected", "bad_source")
    assert _count(sessions, Label) == 0
    for bad in ("idv\u202e10_", "idv_01\u200b", "idv\x1b[31m"):
        msg = LabelMessage(fleet=fleet, device_id="d1", sample_ids=(mine.message_id,), label="x")
        ack = ingestor.handle(
            labels, json.dumps({**json.loads(msg.encode()), "label": bad}).encode()
        )
        assert (ack.status, ack.reason) == ("rejected", "bad_name")
        sample = json.loads(sample_message(fleet, _window(2)).encode())
        ack = ingestor.handle(
            topic(fleet, "d1", "samples"), json.dumps({**sample, "predicted": bad}).encode()
        )
        assert (ack.status, ack.reason) == ("rejected", "bad_name")
    with sessions() as s:
        details = list(s.scalars(select(DeadLetter.detail).where(DeadLetter.reason == "bad_name")))
    assert any("U+202E (RIGHT-TO-LEFT OVERRIDE)" in d for d in details)
    ok = LabelMessage(fleet=fleet, device_id="d1", sample_ids=(mine.message_id,), label="idv_01")
    assert ingestor.handle(labels, ok.encode()).status == "stored"
    with sessions() as s:
        assert [(lab.label, lab.source) for lab in s.scalars(select(Label))] == [
            ("idv_01", "device")
        ]


def test_an_allowed_class_lands_unattended_and_an_unknown_one_is_dead_lettered(
    pg_url, s3_store, fleet
):
    """A fleet created as `edgeloop cloud init` creates it (allow-list: the base set's
    classes; tests/test_fleet_init.py checks init sets it): a device's label of an allowed
    class is stored with no operator step, one of a class nobody listed is dead-lettered."""
    sessions = _registered(pg_url, fleet, "d1", classes=["normal", "idv_01", "idv_02"])
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    a, b = sample_message(fleet, _window(1)), sample_message(fleet, _window(2))
    for m in (a, b):
        assert ingestor.handle(topic(fleet, "d1", "samples"), m.encode()).status == "stored"
    ok = LabelMessage(fleet=fleet, device_id="d1", sample_ids=(a.message_id,), label="idv_02")
    assert ingestor.handle(topic(fleet, "d1", "labels"), ok.encode()).status == "stored"
    typo = LabelMessage(fleet=fleet, device_id="d1", sample_ids=(b.message_id,), label="idv_2")
    ack = ingestor.handle(topic(fleet, "d1", "labels"), typo.encode())
    assert (ack.status, ack.reason) == ("rejected", "label_not_allowed")
    with sessions() as s:
        assert [(lab.sample_id, lab.label) for lab in s.scalars(select(Label))] == [
            (str(a.message_id), "idv_02")
        ]


def test_windows_of_another_shape_or_dtype_than_the_fleets_model_are_refused(
    pg_url, s3_store, fleet, tiny_package
):
    """The fleet's promoted model takes (T, C) float32 windows (its manifest's input spec):
    a 1×1 window, a window of other T or C, and one of float64 are refused (bad_shape,
    bad_dtype); a fleet setting names the shape where no model does."""
    from shared.package import ModelPackage

    package, _ = tiny_package
    spec = ModelPackage(package).manifest.input
    sessions = _registered(pg_url, fleet, "d1", classes=["normal"])
    s3_store.put("models/m.edgepkg", package)
    with sessions() as s:
        s.add(ModelVersion(name=f"edgeloop.{fleet}.cpu-fp32", version="v1", profile="cpu-fp32",
                           sha256="0" * 64, object_key="models/m.edgepkg", class_names=["normal"],
                           gates={"passed": True}))  # fmt: skip
        s.commit()
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    samples = topic(fleet, "d1", "samples")
    T, C = spec.window, spec.channels
    for shape, dtype, reason in (
        ((1, 1), "float32", "bad_shape"),
        ((T + 1, C), "float32", "bad_shape"),
        ((T, C - 1), "float32", "bad_shape"),
        ((T, C), "float64", "bad_dtype"),
    ):
        ack = ingestor.handle(samples, sample_message(fleet, _window(1, shape, dtype)).encode())
        assert (ack.status, ack.reason) == ("rejected", reason), shape
    assert (
        ingestor.handle(samples, sample_message(fleet, _window(1, (T, C))).encode()).status
        == "stored"
    )
    assert _count(sessions, Sample) == 1
    # Without a model, a fleet setting names the shape.
    other = f"{fleet}x"
    _registered(pg_url, other, "d2", classes=["normal"], settings={"window": [8, 3]})
    fresh = Ingestor(sessions=sessions, store=s3_store)
    bad = sample_message(other, _window(1, (1, 1)), device_id="d2")
    assert fresh.handle(topic(other, "d2", "samples"), bad.encode()).reason == "bad_shape"
    good = sample_message(other, _window(1, (8, 3)), device_id="d2")
    assert fresh.handle(topic(other, "d2", "samples"), good.encode()).status == "stored"


def test_a_throttled_agent_loses_nothing_and_its_samples_land_once_the_budget_allows(
    tmp_path, pg_url, s3_store, mqtt_port, fleet, tiny_package, tep_small
):
    """A fleet's upload budget of about two samples a second, a bucket of one second: a real
    agent uploading a burst gets retry acks (never rejected), keeps the messages in its
    buffer, resends them after retry_after_s, and every sample is stored exactly once."""
    package, _ = tiny_package
    _, golden = tep_small
    windows = np.concatenate([windows_of(golden, c, 6) for c in ("idv_01", "idv_07")])
    probe = sample_message(fleet, windows[0].astype("f4")).encode()
    budget = int(len(probe) * 1.0 * 2.0 * 3600)  # bytes per hour: two samples a second
    sessions = _registered(pg_url, fleet, "d1", classes=list(golden.class_names),
                           settings={"upload_bytes_per_hour": budget})  # fmt: skip
    limits = IngestLimits(quota_factor=1.0, burst_s=1.0)
    service = IngestService(
        Ingestor(sessions=sessions, store=s3_store, limits=limits),
        host=HOST, port=mqtt_port, fleet=fleet, group=f"g{fleet}",
    )  # fmt: skip
    service.start()
    assert service.ready.wait(10)
    listener = AckListener(mqtt_port, fleet, "d1")
    agent = make_agent(tmp_path, fleet, mqtt_port, package, resend_after_s=30.0)
    try:
        sent = [m for w in windows if (m := agent.process(w)[1])]
        assert len(sent) >= 8
        t0 = time.monotonic()
        wait_for(lambda: agent.backlog() == 0, 60, agent.tick, "every sample acked")
        took = time.monotonic() - t0
    finally:
        agent.stop()
        listener.stop()
        service.stop()
    statuses = {a.status for a in listener.acks}
    assert "retry" in statuses and "rejected" not in statuses
    retried = [a for a in listener.acks if a.status == "retry"]
    assert all(a.retry_after_s is not None and a.retry_after_s >= 1 for a in retried)
    assert service.ingestor.counters.throttled >= len(sent) - 3
    with sessions() as s:
        ids = sorted(s.scalars(select(Sample.id)))
    assert ids == sorted(str(m.message_id) for m in sent)  # each once, none lost
    # resend_after_s is 30 s: only the retry acks' retry_after_s brought them back this soon.
    assert took < 30, took
    print(f"{len(sent)} samples, {len(retried)} retry acks, all stored after {took:.1f} s")


def test_an_agent_before_retry_ignores_the_ack_and_keeps_the_message(
    tmp_path, mqtt_port, fleet, tiny_package
):
    """An agent that predates ``retry`` (its Ack model: three statuses, no unknown fields)
    cannot decode a retry ack; its link logs the error and the message stays in its buffer
    (resent after resend_after_s). The other acks still decode there: ``retry_after_s``
    goes on the wire only with ``retry``."""
    from typing import Literal

    from pydantic import ValidationError

    from shared.messages import Envelope

    class OldAck(Envelope):  # shared.messages.Ack before retry, as old agents have it
        acked_ids: tuple[uuid.UUID, ...]
        status: Literal["stored", "duplicate", "rejected"]
        reason: str | None = None

    mid = uuid.uuid4()
    retry = Ack(
        fleet=fleet,
        device_id="d1",
        acked_ids=(mid,),
        status="retry",
        reason="quota",
        retry_after_s=5,
    )
    stored = Ack(fleet=fleet, device_id="d1", acked_ids=(mid,), status="stored")
    with pytest.raises(ValidationError):
        OldAck.model_validate_json(retry.encode())
    assert OldAck.model_validate_json(stored.encode()).status == "stored"
    assert b"retry_after_s" not in stored.encode()

    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    try:
        agent.buffer.put(str(mid), topic(fleet, "d1", "samples"), b"{}")
        broken = SimpleNamespace(
            topic=topic(fleet, "d1", "acks"), payload=retry.encode().replace(b'"retry"', b'"later"')
        )
        agent.link._on_message(None, None, broken)  # what an old agent's decode does: raise
        assert agent.buffer.depth() == 1
        agent.link._on_message(
            None, None, SimpleNamespace(topic=broken.topic, payload=retry.encode())
        )
        assert agent.buffer.depth() == 1  # this agent: kept, held back until retry_after_s
        assert agent.flush() == 0
    finally:
        agent.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_an_outage_is_never_acked_as_rejected(pg_url, s3_store, fleet):
    """With the object store unreachable (a port nobody listens on) or the database dropped
    mid-test, a bad message and a good one both raise a transient error out of the Ingestor
    (the service then retries and acks nothing), never a rejected ack."""
    sessions = _registered(pg_url, fleet, "d1")
    proxy = TcpProxy(S3_PORT).start()
    dead_s3 = S3ObjectStore(
        endpoint=f"{HOST}:{proxy.port}",
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        bucket=s3_store.bucket,
    )
    proxy.stop()  # nobody listens on its port now
    samples = topic(fleet, "d1", "samples")
    good = sample_message(fleet, _window(1)).encode()
    for payload in (b"garbage", POISON, good):
        with pytest.raises(TRANSIENT):
            Ingestor(sessions=sessions, store=dead_s3).handle_batch([(samples, payload)])
    assert _count(sessions, DeadLetter) == 0 and _count(sessions, Sample) == 0

    ingestor = Ingestor(sessions=sessions, store=s3_store)
    assert ingestor.handle(samples, good).status == "stored"
    name = pg_url.rsplit("/", 1)[-1]
    with psycopg.connect(
        f"postgresql://postgres@{HOST}:{PG_PORT}/postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    for payload in (b"garbage", sample_message(fleet, _window(2)).encode()):
        with pytest.raises(TRANSIENT):
            ingestor.handle_batch([(samples, payload)])


def test_dead_letters_keep_a_prefix_and_a_device_past_its_cap_is_counted_not_stored(
    tmp_path, pg_url, fleet
):
    """A dead letter keeps at most dead_letter_max_bytes of the payload with its full length
    and sha256; past dead_letters_per_device_hour a device's garbage adds no row and no
    object: its newest row counts it by reason. Another device is not affected."""
    sessions = _registered(pg_url, fleet, "d1", "d2")
    store = LocalObjectStore(tmp_path / "objects")
    limits = IngestLimits(dead_letter_max_bytes=1024, dead_letters_per_device_hour=3)
    ingestor = Ingestor(sessions=sessions, store=store, limits=limits)
    huge = b"\xff" * 900_000
    ingestor.handle(topic(fleet, "d1", "samples"), huge)
    with sessions() as s:
        row = s.scalars(select(DeadLetter)).one()
    assert (row.payload_bytes, row.payload_sha256) == (len(huge), hashlib.sha256(huge).hexdigest())
    assert store.get(row.payload_key) == huge[:1024]
    assert row.received_at is not None  # what retention expires by
    for _ in range(2):
        ingestor.handle(topic(fleet, "d1", "samples"), b"not json")
    for _ in range(5):
        ingestor.handle(topic(fleet, "d1", "labels"), b"{}")
    ingestor.handle(topic(fleet, "d1", "heartbeat"), b"[" * 5000)
    assert _count(sessions, DeadLetter, DeadLetter.device_id == "d1") == 3
    assert len(store.list("dead-letters/")) == 3
    with sessions() as s:
        newest = s.scalars(select(DeadLetter).order_by(DeadLetter.id.desc())).first()
    assert newest.suppressed == {"bad_schema": 5, "too_deep": 1}
    assert ingestor.counters.dead_letters["suppressed"] == 6
    ingestor.handle(topic(fleet, "d2", "samples"), b"not json")
    assert _count(sessions, DeadLetter, DeadLetter.device_id == "d2") == 1


def test_liveness_endpoint_says_whether_the_workers_run(pg_url, s3_store, mqtt_port, fleet):
    """/healthz answers 503 before the workers start, 200 with counters while they run."""
    sessions = _registered(pg_url, fleet, "d1")
    service = IngestService(Ingestor(sessions=sessions, store=s3_store), host=HOST, port=mqtt_port,
                            fleet=fleet, group=f"g{fleet}")  # fmt: skip
    server = serve_health(service.health, port=0)
    url = f"http://{HOST}:{server.server_address[1]}/healthz"
    try:
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(url, timeout=5)
        assert down.value.code == 503
        assert json.loads(down.value.read())["workers_alive"] == 0
        service.start()
        assert service.ready.wait(10)
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200 and body["alive"] and body["connected"]
        assert body["workers"] == body["workers_alive"] == 1
    finally:
        server.shutdown()
        service.stop()


def test_the_ingest_command_serves_healthz(pg_url, s3_store, mqtt_port, fleet):
    """`edgeloop cloud ingest --health-port P` serves /healthz (what compose probes)."""
    import os
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "EDGELOOP_DATABASE_URL": pg_url, "EDGELOOP_STORE": "s3",
           "EDGELOOP_S3_ENDPOINT": f"{HOST}:{S3_PORT}", "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
           "EDGELOOP_S3_SECRET_KEY": S3_SECRET, "EDGELOOP_S3_BUCKET": s3_store.bucket,
           "EDGELOOP_MQTT_PORT": str(mqtt_port)}  # fmt: skip
    cmd = [sys.executable, "-c", "from shared.cli import main; main()", "cloud", "ingest",
           "--fleet", fleet, "--group", f"g{fleet}", "--health-port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    body: dict = {}

    def probe() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as resp:
                body.update(json.loads(resp.read()))
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(probe, 30, what="/healthz")
        assert body["alive"] and body["workers_alive"] == 1
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_worker_survives_an_error_no_check_foresaw(pg_url, s3_store, mqtt_port, fleet):
    """Whatever a message makes the Ingestor raise (here a RecursionError planted in it),
    the service dead-letters that message (internal_error), acks it, keeps its worker and
    stores the next one."""
    sessions = _registered(pg_url, fleet, "d1")
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    real = ingestor.handle_batch
    marker = b'"predicted":"boom"'

    def flaky(items):
        if any(marker in p for _, p in items):
            raise RecursionError("planted")
        return real(items)

    ingestor.handle_batch = flaky  # type: ignore[method-assign]
    service = IngestService(ingestor, host=HOST, port=mqtt_port, fleet=fleet, group=f"g{fleet}")
    service.start()
    assert service.ready.wait(10)
    device = AckListener(mqtt_port, fleet, "d1")
    try:
        boom = sample_message(fleet, _window(1), predicted="boom")
        device.publish(topic(fleet, "d1", "samples"), boom.encode())
        device.publish(topic(fleet, "d1", "samples"), sample_message(fleet, _window(2)).encode())
        wait_for(lambda: _count(sessions, Sample) == 1, 20, what="the next sample")
        wait_for(lambda: len(device.acks) >= 2, 10, what="both acks")
        assert service.health()["alive"] and service.health()["workers_alive"] == 1
    finally:
        device.stop()
        service.stop()
    assert _count(sessions, DeadLetter, DeadLetter.reason == "internal_error") == 1
    rejected = [a for a in device.acks if a.status == "rejected"]
    assert [(a.acked_ids, a.reason) for a in rejected] == [((boom.message_id,), "internal_error")]
