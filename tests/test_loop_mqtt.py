"""Edge agent → Mosquitto → ingest → PostgreSQL + SeaweedFS S3 → acks, for real."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.store.db import DeadLetter, Device, Label, Sample, session_factory
from cloud.store.objects import LocalObjectStore
from cloud.store.records import register_device
from cloud.store.windows import load_window
from shared.topics import topic

from .conftest import HOST, make_agent, repackage, sample_message, wait_for, windows_of


@pytest.fixture
def cloud(pg_url, s3_store, mqtt_port, fleet):
    sessions = session_factory(pg_url)
    for dev in ("d1", "d2"):
        with sessions() as s:
            register_device(session=s, device_id=dev, fleet=fleet, profile="cpu-fp32")
    ingestor = Ingestor(sessions=sessions, store=s3_store)

    def start():
        svc = IngestService(ingestor, host=HOST, port=mqtt_port, fleet=fleet, group=f"g{fleet}")
        svc.start()
        assert svc.ready.wait(10)
        time.sleep(0.2)  # the SUBACK follows the CONNACK
        return svc

    services = []
    yield type(
        "Cloud",
        (),
        {
            "sessions": sessions,
            "store": s3_store,
            "ingestor": ingestor,
            "start": lambda self: services.append(start()) or services[-1],
        },
    )()
    for svc in services:
        svc.stop()


def count(sessions, model, *where):
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def test_uploads_are_stored_once_and_acked(
    tmp_path, cloud, fleet, mqtt_port, tiny_package, tep_small
):
    """Faulty windows are uploaded, stored in S3 + Postgres, acked, and leave the buffer;
    their delayed labels land in the labels table."""
    cloud.start()
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    try:
        _, golden = tep_small
        sent = [
            msg
            for w in windows_of(golden, "idv_01", 12)
            if (msg := agent.process(w)[1]) is not None
        ]
        assert len(sent) >= 10  # a fault the model knows is uploaded as "faulty"
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "acks")
        assert count(cloud.sessions, Sample, Sample.device_id == "d1") == len(sent)
        with cloud.sessions() as s:
            rows = s.execute(select(Sample.object_key, Sample.object_index)).all()
        assert all(cloud.store.exists(key) for key, _ in rows)
        assert all(load_window(cloud.store, *row).shape == (32, 53) for row in rows)
        agent.report_label([m.message_id for m in sent], "idv_01")
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "label ack")
        assert count(cloud.sessions, Label, Label.label == "idv_01") == len(sent)
        agent.heartbeat()
        wait_for(
            lambda: (
                count(cloud.sessions, Device, Device.id == "d1", Device.last_seen.is_not(None)) == 1
            ),
            10,
            what="heartbeat",
        )
    finally:
        agent.stop()


def test_redelivery_and_shared_windows_change_nothing(
    tmp_path, cloud, fleet, mqtt_port, tiny_package, tep_small
):
    """A replayed message is acked as duplicate and stored once; the same window from two
    devices is one object linked by two rows."""
    cloud.start()
    a1 = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], "d1")
    a2 = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], "d2")
    try:
        _, golden = tep_small
        w = windows_of(golden, "idv_02", 1)[0]
        _, m1 = a1.process(w)
        _, m2 = a2.process(w)
        assert m1 is not None and m2 is not None
        # The same message again (same id, same window), as a resend would carry it.
        replay = sample_message(fleet, w, message_id=m1.message_id, predicted="idv_02").encode()
        wait_for(
            lambda: a1.backlog() == a2.backlog() == 0,
            30,
            lambda: (a1.tick(), a2.tick()),
            "acks",
        )
        # Replay m1 three times, as a QoS 1 redelivery or a device resend would.
        for _ in range(3):
            a1.link.client.publish(topic(fleet, "d1", "samples"), replay, qos=1)
        wait_for(lambda: cloud.ingestor.counters.duplicates >= 3, 20, what="duplicates")
        assert count(cloud.sessions, Sample) == 2
        with cloud.sessions() as s:
            assert len(set(s.scalars(select(Sample.content_sha256)))) == 1
        assert len(cloud.store.list("windows/")) == 1
    finally:
        a1.stop()
        a2.stop()


def test_buffer_holds_until_ingest_is_back(
    tmp_path, cloud, fleet, mqtt_port, tiny_package, tep_small
):
    """With no ingest running nothing is acked and nothing leaves the buffer; once ingest
    starts, every sample arrives exactly once."""
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    try:
        _, golden = tep_small
        sent = [m for w in windows_of(golden, "idv_07", 8) if (m := agent.process(w)[1])]
        for _ in range(5):
            agent.tick()
            time.sleep(0.2)
        agent.sync()
        assert agent.backlog() == len(sent) > 0
        cloud.start()
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "catch-up")
        assert count(cloud.sessions, Sample) == len(sent)
    finally:
        agent.stop()


def test_malformed_messages_are_dead_lettered(
    tmp_path, cloud, fleet, mqtt_port, tiny_package, tep_small
):
    """Garbage, wrong schema, NaN, unknown devices and impersonation are dead-lettered with
    their reason; the ingest keeps storing good samples."""
    cloud.start()
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    try:
        _, golden = tep_small
        window = windows_of(golden, "idv_01", 1)[0]
        agent.process(window)
        good = json.loads(
            sample_message(fleet, window, predicted="idv_01", confidence=0.9).encode()
        )
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "first ack")

        def variant(**changes):
            d = json.loads(json.dumps(good))
            d["message_id"] = str(uuid.uuid4())
            d.update(changes)
            return json.dumps(d).encode()

        nan_window = np.full((32, 53), np.nan, dtype=np.float32)
        nan_tensor = {
            "dtype": "float32",
            "shape": [32, 53],
            "data": base64.b64encode(nan_window.tobytes()).decode(),
        }
        bad = [
            (topic(fleet, "d1", "samples"), b"{not json", "bad_json"),
            (topic(fleet, "d1", "samples"), variant(schema_version=9), "bad_schema_version"),
            (topic(fleet, "d1", "samples"), variant(window=nan_tensor), "non_finite"),
            (topic(fleet, "ghost", "samples"), variant(device_id="ghost"), "unknown_device"),
            (topic(fleet, "d2", "samples"), variant(), "device_mismatch"),
        ]
        for t, payload, _ in bad:
            agent.link.client.publish(t, payload, qos=1)
        wait_for(lambda: count(cloud.sessions, DeadLetter) == len(bad), 20, what="dead letters")
        with cloud.sessions() as s:
            reasons = sorted(s.scalars(select(DeadLetter.reason)))
            keys = list(s.scalars(select(DeadLetter.payload_key)))
        assert reasons == sorted(r for *_, r in bad)
        assert all(cloud.store.exists(k) for k in keys)  # raw payloads kept for inspection
        agent.process(windows_of(golden, "idv_02", 1)[0])
        wait_for(lambda: agent.backlog() == 0, 30, agent.tick, "ack after bad input")
        assert count(cloud.sessions, Sample) == 2
    finally:
        agent.stop()


def test_update_signed_by_another_repository_is_refused(
    tmp_path, fleet, mqtt_port, s3_store, tiny_package
):
    """A release signed with keys the device was not enrolled with (another repository
    for the same fleet) is refused as bad_signature and v1 keeps serving; the fleet's own
    release of the same package installs."""
    from .test_transfer import FleetRepo, start_transport

    repo = FleetRepo(s3_store, fleet, tmp_path / "keys")
    forger = FleetRepo(LocalObjectStore(tmp_path / "forged"), fleet, tmp_path / "forged-keys")
    transport = start_transport(mqtt_port, s3_store, fleet)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    agent.enroll(repo.root)
    try:
        v2 = repackage(tiny_package, "v2")
        forger.offer(transport, *forger.release(v2))
        wait_for(lambda: agent.update_events, 30, what="the refusal")
        first = agent.update_events[0]
        assert (first.target_version, first.status, first.reason) == (
            "v2",
            "rejected",
            "bad_signature",
        )
        assert agent.model_version == "v1"
        repo.offer(transport, *repo.release(v2))
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live")
        assert agent.update_events[-1].status == "applied"
    finally:
        agent.stop()
        transport.stop()


def test_edge_agent_imports_nothing_heavy():
    """The agent's modules load without torch, transformers, mlflow, celery, sqlalchemy."""
    code = (
        "import sys, edge_agent.agent, edge_agent.cli, edge_agent.updater;"
        "heavy=('torch','transformers','mlflow','celery','sqlalchemy','cloud','sim');"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
