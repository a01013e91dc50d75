"""Ingest under failure: its store or database gone for a while, an ingest killed
mid-stream, and malformed payloads thrown at it."""

from __future__ import annotations

import math
import time
import uuid
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.limits import IngestLimits
from cloud.ingest.service import IngestService
from cloud.store.db import DeadLetter, Sample, session_factory
from cloud.store.objects import S3ObjectStore
from cloud.store.records import register_device
from shared.messages import utcnow
from shared.topics import topic

from .conftest import (
    HOST,
    PG_PORT,
    S3_KEY,
    S3_PORT,
    S3_SECRET,
    ingest_connected,
    make_agent,
    sample_message,
    wait_for,
    windows_of,
)
from .proxy import TcpProxy


def stored(sessions) -> tuple[int, int]:
    with sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Sample)),
            s.scalar(select(func.count(func.distinct(Sample.id)))),
        )


@pytest.mark.parametrize("outage", ["s3", "postgres"])
def test_outage_means_no_ack_then_catch_up(
    outage, tmp_path, pg_url, s3_store, mqtt_port, fleet, tiny_package, tep_small
):
    """With S3 or PostgreSQL cut off, ingest stores nothing, acks nothing and keeps
    running; once it is back, every sample is stored exactly once."""
    s3_proxy, pg_proxy = TcpProxy(S3_PORT).start(), TcpProxy(PG_PORT).start()
    store = S3ObjectStore(
        endpoint=f"{HOST}:{s3_proxy.port}",
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        bucket=s3_store.bucket,
    )
    sessions = session_factory(pg_url)  # migrations straight, the ingest through the proxy
    proxied = session_factory(pg_url.replace(f":{PG_PORT}/", f":{pg_proxy.port}/"))
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    service = IngestService(
        Ingestor(sessions=proxied, store=store),
        host=HOST,
        port=mqtt_port,
        fleet=fleet,
        group=f"g{fleet}",
    )
    service.start()
    assert service.ready.wait(10)
    time.sleep(0.2)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    _, golden = tep_small
    faulty = np.concatenate([windows_of(golden, c, 6) for c in ("idv_01", "idv_07")])
    try:
        sent = [m for w in faulty[:6] if (m := agent.process(w)[1])]
        wait_for(lambda: agent.backlog() == 0, 20, agent.tick, "acks before the outage")
        (s3_proxy if outage == "s3" else pg_proxy).stop()
        sent += [m for w in faulty[6:] if (m := agent.process(w)[1])]
        for _ in range(30):  # three seconds of resends against a dead store
            agent.tick()
            time.sleep(0.1)
        agent.sync()
        assert agent.backlog() == len(sent) - 6 > 0  # nothing acked while it is down
        assert stored(sessions)[0] == 6
        (s3_proxy if outage == "s3" else pg_proxy).start()
        wait_for(lambda: agent.backlog() == 0, 60, agent.tick, "catch-up")
        assert stored(sessions) == (len(sent), len(sent))
        assert service.client.is_connected()
    finally:
        agent.stop()
        service.stop()
        s3_proxy.stop()
        pg_proxy.stop()


def test_timestamps_from_a_broken_clock_are_dead_lettered(pg_url, s3_store, fleet):
    """A sample stamped in the future, or older than the retention window, is refused; one
    just inside the window is stored."""
    from cloud.ingest.validate import MAX_AGE

    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    window = np.zeros((32, 53), dtype=np.float32)
    for when in (utcnow() + timedelta(hours=2), utcnow() - MAX_AGE - timedelta(hours=1)):
        msg = sample_message(fleet, window, captured_at=when)
        ack = ingestor.handle(topic(fleet, "d1", "samples"), msg.encode())
        assert ack is not None and ack.status == "rejected" and ack.reason == "bad_timestamp"
    msg = sample_message(fleet, window, captured_at=utcnow() - MAX_AGE + timedelta(hours=1))
    assert ingestor.handle(topic(fleet, "d1", "samples"), msg.encode()).status == "stored"
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 2
        assert s.scalar(select(func.count()).select_from(Sample)) == 1


def test_a_sample_another_ingest_stored_first_is_acked_once_and_the_rest_lands(
    pg_url, s3_store, fleet, tep_small
):
    """Two ingests on one shared subscription can hold the same redelivered message: B
    stores it between A's duplicate check and A's bulk write. A's write then fails on the
    id; A stores the rest one by one and acks that one as a duplicate. Every window is
    stored once, readable, with its own content hash."""
    from sqlalchemy import event

    from cloud.store.windows import content_sha256, load_window

    sessions_a, sessions_b = session_factory(pg_url), session_factory(pg_url)
    with sessions_a() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    a = Ingestor(sessions=sessions_a, store=s3_store)
    b = Ingestor(sessions=sessions_b, store=s3_store)
    train, _ = tep_small
    items = [
        (topic(fleet, "d1", "samples"), sample_message(fleet, w).encode()) for w in train.x[:6]
    ]
    engine = sessions_a.kw["bind"]
    raced = []

    def b_stores_one_first(conn, cursor, statement, params, context, executemany):
        # A has checked which ids are new and now looks up content hashes: B wins here.
        if "content_sha256" in statement and not raced:
            raced.append(b.handle(*items[2]))

    event.listen(engine, "before_cursor_execute", b_stores_one_first)
    try:
        receipts = a.handle_batch(items)
    finally:
        event.remove(engine, "before_cursor_execute", b_stores_one_first)

    assert raced and raced[0].status == "stored"
    assert [r.status for r in receipts] == ["stored"] * 2 + ["duplicate"] + ["stored"] * 3
    assert stored(sessions_a) == (6, 6)
    with sessions_a() as s:
        rows = s.scalars(select(Sample).order_by(Sample.captured_at)).all()
    for row in rows:
        window = load_window(s3_store, row.object_key, row.object_index)
        assert content_sha256(window) == row.content_sha256
    assert sorted(r.content_sha256 for r in rows) == sorted(content_sha256(w) for w in train.x[:6])


# -- fuzz: whatever arrives, the ingest dead-letters it with a reason and goes on ----------


def _valid() -> dict:
    """A valid sample as raw JSON, stamped now: the fuzz mutates one thing at a time, so the
    rest must pass every check, the age limit included (a fixed date here once aged out and
    every mutation was refused for its age instead of for what it broke)."""
    now = (utcnow() - timedelta(minutes=5)).isoformat()
    return {
        "schema_version": 1,
        "message_id": str(uuid.uuid4()),
        "fleet": "F",
        "device_id": "d1",
        "sent_at": now,
        "window": {"dtype": "float32", "shape": [2, 2], "data": "AACAPwAAgD8AAIA/AACAPw=="},
        "channels": 2,
        "captured_at": now,
        "model_version": "v1",
        "predicted": "normal",
        "confidence": 0.5,
        "score": 0.1,
        "reasons": ["uncertain"],
    }


VALID = _valid()  # its field names, for the strategies
NAN_DATA = "AADAfwAAwH8AAMB/AADAfw=="  # four float32 NaNs
INF_DATA = "AACAfwAAgH8AAIB/AACAfw=="  # four float32 +inf


def _mutations():
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )
    field = st.sampled_from(sorted(VALID))
    # Fields without a default: dropping one makes the message invalid.
    required = st.sampled_from(
        [
            "fleet",
            "device_id",
            "window",
            "channels",
            "captured_at",
            "model_version",
            "predicted",
            "confidence",
            "score",
        ]
    )
    wrong_type = st.fixed_dictionaries({"not": json_values})  # no field takes this
    return st.one_of(
        st.tuples(st.just("raw"), st.binary(max_size=300)),
        st.tuples(st.just("json"), json_values),
        st.tuples(st.just("version"), st.integers().filter(lambda v: v != 1)),
        st.tuples(st.just("drop"), required),
        st.tuples(st.just("replace"), st.tuples(field, wrong_type)),
        st.tuples(st.just("nonfinite"), st.sampled_from([NAN_DATA, INF_DATA])),
        st.tuples(st.just("shape"), st.lists(st.integers(1, 70000), min_size=1, max_size=5)),
        st.tuples(st.just("oversize"), st.integers(1 << 20, (1 << 20) + 5000)),
        st.tuples(st.just("stranger"), st.sampled_from(["ghost", "d2"])),
        st.tuples(st.just("unknown"), st.just("ghost")),
    )


def _payload(kind, arg, fleet):
    """(device the topic names, payload bytes) for one mutation of a valid sample."""
    import json

    msg = _valid()
    msg["fleet"] = fleet
    device = "d1"
    if kind == "raw":
        return device, arg
    if kind == "json":
        return device, json.dumps(arg).encode()
    if kind == "version":
        msg["schema_version"] = arg
    elif kind == "drop":
        del msg[arg]
    elif kind == "replace":
        name, value = arg
        msg[name] = value
    elif kind == "nonfinite":
        msg["window"]["data"] = arg
    elif kind == "shape":
        msg["window"]["shape"] = arg if arg != [2, 2] else [3, 2]
    elif kind == "oversize":
        msg["model_version"] = "v" * arg
    elif kind == "stranger":
        device = arg  # published under another id than the envelope's, or an unknown one
    elif kind == "unknown":
        device = msg["device_id"] = arg  # names itself truly, but was never registered
    return device, json.dumps(msg).encode()


def _expected_reasons(kind, arg) -> set[str]:
    """The dead-letter reasons a mutation may get: the check for what it broke, never an
    earlier check tripping over something it left alone."""
    from shared.messages import MAX_TENSOR_ELEMENTS

    if kind in ("raw", "json"):  # rarely, random JSON is an object naming a version
        return {"bad_json", "bad_schema", "bad_schema_version", "too_deep"}
    if kind == "version" or (kind == "replace" and arg[0] == "schema_version"):
        return {"bad_schema_version"}
    if kind == "shape":
        if len(arg) > 4 or max(arg) > MAX_TENSOR_ELEMENTS:
            return {"bad_schema"}
        return {"tensor_too_large" if math.prod(arg) > MAX_TENSOR_ELEMENTS else "bad_shape"}
    return {
        "drop": {"bad_schema"},
        "replace": {"bad_schema"},
        "nonfinite": {"non_finite"},
        "oversize": {"oversize"},
        "stranger": {"device_mismatch"},
        "unknown": {"unknown_device"},
    }[kind]


# Each branch at least once, whatever Hypothesis draws.
EVERY_BRANCH = [
    ("raw", b"\xff\xfe not json"),
    ("json", [1, "a"]),
    ("version", 2),
    ("drop", "window"),
    ("replace", ("score", {"not": None})),
    ("nonfinite", NAN_DATA),
    ("nonfinite", INF_DATA),
    ("shape", [3, 2]),  # 6 elements, the data holds 4
    ("shape", [1, 4]),  # 4 elements, but not (T, channels)
    ("shape", [300, 300]),
    ("shape", [1, 1, 1, 1, 1]),
    ("oversize", 1 << 20),
    ("stranger", "d2"),
    ("stranger", "ghost"),
    ("unknown", "ghost"),
]


def test_fuzzed_payloads_are_dead_lettered(pg_url, s3_store, fleet):
    """Random bytes, random JSON, wrong versions, missing or wrong fields, NaN/inf, wrong
    shapes, oversize payloads, impersonation and unknown devices: each becomes exactly one
    dead letter whose reason is the check for what was broken, nothing is stored as a
    sample, and the unmutated message is stored."""
    import json

    from hypothesis import HealthCheck, example, given, settings

    sessions = session_factory(pg_url)
    with sessions() as s:
        for d in ("d1", "d2"):
            register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
    # One row per mutation: no per-device dead-letter cap here (test_hostile_ingest has it).
    limits = IngestLimits(dead_letters_per_device_hour=1_000_000)
    ingestor = Ingestor(sessions=sessions, store=s3_store, limits=limits)

    def dead_letters() -> tuple[int, str | None]:
        with sessions() as s:
            newest = s.scalar(select(DeadLetter.reason).order_by(DeadLetter.id.desc()).limit(1))
            return s.scalar(select(func.count()).select_from(DeadLetter)), newest

    reached: dict[str, set[str]] = {}

    @settings(deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutations())
    def check(mutation):
        before, _ = dead_letters()
        device, payload = _payload(*mutation, fleet)
        ack = ingestor.handle(topic(fleet, device, "samples"), payload)
        after, reason = dead_letters()
        assert after == before + 1
        assert reason in _expected_reasons(*mutation), (mutation[0], reason)
        assert ack is None or (ack.status, ack.reason) == ("rejected", reason)
        assert stored(sessions)[0] == 0
        reached.setdefault(mutation[0], set()).add(reason)

    for mutation in EVERY_BRANCH:
        check = example(mutation)(check)
    check()

    assert reached.keys() == {kind for kind, _ in EVERY_BRANCH}
    assert reached["nonfinite"] == {"non_finite"}
    assert {"bad_shape", "tensor_too_large", "bad_schema"} <= reached["shape"]
    assert reached["stranger"] == {"device_mismatch"}
    assert reached["unknown"] == {"unknown_device"}
    with sessions() as s:
        assert "bad_timestamp" not in set(s.scalars(select(DeadLetter.reason)))
    # The message every mutation started from passes every check.
    unmutated = {**_valid(), "fleet": fleet}
    ack = ingestor.handle(topic(fleet, "d1", "samples"), json.dumps(unmutated).encode())
    assert ack is not None and ack.status == "stored"
    good = sample_message(fleet, np.ones((32, 53), dtype=np.float32))
    ack = ingestor.handle(topic(fleet, "d1", "samples"), good.encode())
    assert ack is not None and ack.status == "stored"


def test_fleet_status_and_operator_labels(pg_url, s3_store, fleet):
    """The fleet view counts samples, labels and dead letters per device; operator labels
    replace earlier operator labels and refuse unknown samples."""
    from cloud.rollout.fleet import fleet_status, label_samples
    from shared.errors import DataError

    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    ids = []
    for i in range(3):
        msg = sample_message(fleet, np.full((32, 53), i, dtype=np.float32))
        assert ingestor.handle(topic(fleet, "d1", "samples"), msg.encode()).status == "stored"
        ids.append(str(msg.message_id))
    ingestor.handle(topic(fleet, "d1", "samples"), b"garbage")
    with sessions() as s:
        assert label_samples(session=s, sample_ids=ids[:2], label="idv_01") == 2
        label_samples(session=s, sample_ids=ids[:1], label="idv_02")
        with pytest.raises(DataError, match="no uploaded sample"):
            label_samples(session=s, sample_ids=["nope"], label="x")
        (row,) = fleet_status(session=s, fleet=fleet)
    assert (row.device_id, row.samples, row.labelled) == ("d1", 3, 2)
    assert row.dead_letters == {"bad_json": 1}


def test_ingest_killed_mid_stream_stores_everything_once(
    tmp_path, pg_url, s3_store, spare_broker, fleet, tep_small
):
    """Devices publish a stream QoS 1 (no device-side resend here); the ingest is killed
    with SIGKILL in the middle and restarted under the same client id: every message ends
    up stored exactly once."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import paho.mqtt.client as mqtt

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            return sock.getsockname()[1]

    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    env = {
        **os.environ,
        "EDGELOOP_DATABASE_URL": pg_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": f"{HOST}:{S3_PORT}",
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": s3_store.bucket,
        "EDGELOOP_MQTT_PORT": str(spare_broker.port),
    }
    cmd = [
        sys.executable,
        "-c",
        "from shared.cli import main; main()",
        "cloud",
        "ingest",
        "--fleet",
        fleet,
        "--group",
        f"g{fleet}",
        "--client-id",
        f"ingest-{fleet}",
        "--health-port",
        str(health_port := free_port()),
    ]

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Connected by its /healthz, not after a fixed wait: a loaded machine took longer.
        wait_for(lambda: ingest_connected(health_port), 60, what="the ingest to connect")
        time.sleep(0.5)  # its subscription (sent on connect) reaches the broker
        return proc

    _, golden = tep_small
    rng = np.random.default_rng(0)
    windows = [
        golden.x[i % len(golden.x)] + rng.normal(0, 1e-3, (32, 53)).astype("f4")
        for i in range(2000)
    ]  # enough that the kill lands mid-stream
    messages = [sample_message(fleet, w).encode() for w in windows]
    ingest = start()
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{fleet}")
    device.connect(HOST, spare_broker.port)
    device.loop_start()
    try:
        infos = [device.publish(topic(fleet, "d1", "samples"), m, qos=1) for m in messages]
        wait_for(lambda: stored(sessions)[0] >= 20, 30, what="the stream to be underway")
        ingest.send_signal(signal.SIGKILL)
        ingest.wait(10)
        at_kill = stored(sessions)[0]
        for info in infos:
            info.wait_for_publish(10)  # the broker has every message
        assert at_kill < len(messages)
        ingest = start()
        wait_for(lambda: stored(sessions)[0] >= len(messages), 60, what="catch-up")
        time.sleep(1.0)  # nothing more arrives: no duplicates stored late
        assert stored(sessions) == (len(messages), len(messages))
        print(f"{at_kill} stored before SIGKILL, {len(messages)} after restart")
    finally:
        device.loop_stop()
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(20)


def test_fields_the_database_would_refuse_and_stale_wills(pg_url, s3_store, fleet):
    """Naive timestamps, over-long names and NUL bytes are dead-lettered before they reach
    PostgreSQL; labels for another device's samples are refused; a Last Will stamped long
    ago still marks its device offline."""
    import json

    from cloud.store.db import Device
    from shared.messages import Heartbeat, LabelMessage

    sessions = session_factory(pg_url)
    with sessions() as s:
        for d in ("d1", "d2"):
            register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
    ingestor = Ingestor(sessions=sessions, store=s3_store)
    good = json.loads(sample_message(fleet, np.zeros((32, 53), dtype=np.float32)).encode())
    for field, value in (
        ("captured_at", (utcnow() - timedelta(minutes=5)).replace(tzinfo=None).isoformat()),
        ("predicted", "x" * 65),
        ("model_version", "v1\x00"),
    ):
        bad = {**good, field: value, "message_id": str(uuid.uuid4())}
        ack = ingestor.handle(topic(fleet, "d1", "samples"), json.dumps(bad).encode())
        assert ack is not None and (ack.status, ack.reason) == ("rejected", "bad_schema")
    theirs = sample_message(fleet, np.ones((32, 53), dtype=np.float32), device_id="d2")
    assert ingestor.handle(topic(fleet, "d2", "samples"), theirs.encode()).status == "stored"
    steal = LabelMessage(
        fleet=fleet, device_id="d1", sample_ids=(theirs.message_id,), label="normal"
    )
    ack = ingestor.handle(topic(fleet, "d1", "labels"), steal.encode())
    assert (ack.status, ack.reason) == ("rejected", "foreign_sample")
    # A device cannot pass its labels off as the cloud teacher's (which rank differently).
    mine = sample_message(fleet, np.full((32, 53), 2, dtype=np.float32))
    assert ingestor.handle(topic(fleet, "d1", "samples"), mine.encode()).status == "stored"
    posing = LabelMessage(
        fleet=fleet, device_id="d1", sample_ids=(mine.message_id,), label="normal",
        source="teacher",
    )  # fmt: skip
    ack = ingestor.handle(topic(fleet, "d1", "labels"), posing.encode())
    assert (ack.status, ack.reason) == ("rejected", "bad_source")
    will = Heartbeat(
        fleet=fleet,
        device_id="d1",
        model_version=None,
        profile="cpu-fp32",
        buffer_depth=0,
        windows_seen=0,
        anomaly_rate=0.0,
        latency_ms_p50=0.0,
        online=False,
        sent_at=utcnow() - timedelta(days=40),
    )
    with sessions() as s:
        s.get(Device, "d1").online = True
        s.commit()
    assert ingestor.handle(topic(fleet, "d1", "heartbeat"), will.encode()) is None
    with sessions() as s:
        device = s.get(Device, "d1")
        assert not device.online
        assert device.last_seen > utcnow() - timedelta(minutes=1)


def test_a_refused_offer_of_unverified_metadata_never_fails_a_rollout_row(pg_url, s3_store, fleet):
    """Anyone on the network can send a device a forged offer naming a rollout's target: its
    refusal (bad_signature, …) is recorded in a row of its own, and the rollout's row for
    that device and version keeps its state until the device reports the real outcome."""
    from cloud.store.db import DeviceUpdate, ModelVersion, Rollout
    from shared.messages import UpdateStatus

    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
        mv = ModelVersion(name="m", version="v2", profile="cpu-fp32", sha256="0" * 64,
                          object_key="k", class_names=["normal", "f"])  # fmt: skip
        s.add(mv)
        s.flush()
        r = Rollout(model_version_id=mv.id, fleet=fleet, profile="cpu-fp32", state="wave")
        s.add(r)
        s.flush()
        s.add(DeviceUpdate(rollout_id=r.id, device_id="d1", target_version="v2", state="sent"))
        s.commit()
        rollout_id = r.id
    ingestor = Ingestor(sessions=sessions, store=s3_store)

    def report(status, reason=None):
        msg = UpdateStatus(fleet=fleet, device_id="d1", target_version="v2", status=status,
                           reason=reason, running_version="v1" if reason else "v2")  # fmt: skip
        ack = ingestor.handle(topic(fleet, "d1", "update-status"), msg.encode())
        assert ack is not None and ack.status == "stored"

    def rows():
        with sessions() as s:
            return [(u.rollout_id, u.state, u.reason)
                    for u in s.scalars(select(DeviceUpdate).order_by(DeviceUpdate.id))]  # fmt: skip

    report("rejected", "bad_signature")
    report("rejected", "mix_and_match")
    assert rows() == [
        (rollout_id, "sent", None),
        (None, "rejected", "bad_signature"),
        (None, "rejected", "mix_and_match"),
    ]
    report("applied")
    assert rows()[0] == (rollout_id, "installed", None)
