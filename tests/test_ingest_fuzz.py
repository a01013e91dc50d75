"""Fuzz of every MQTT payload a device can send at ingest (samples, labels, heartbeats,
update statuses and chunk requests, on every uplink topic): generated JSON nested up to
100k levels, huge strings and numbers, wrong types, valid messages with one field mutated,
random bytes and text that is not UTF-8. Through the real Ingestor (PostgreSQL, an object
store) and through a running IngestService on Mosquitto: only named reasons, never an
exception out of handle_batch, never a hang, workers alive after, and a valid sample
published after the run is stored. Example counts come from the Hypothesis profile
(tests/conftest.py), never from here."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.limits import IngestLimits
from cloud.ingest.service import IngestService
from cloud.store.db import DeadLetter, Sample, session_factory
from cloud.store.objects import LocalObjectStore
from cloud.store.records import register_device
from shared.messages import utcnow
from shared.topics import UPLINK_KINDS, topic

from .conftest import HOST, sample_message, wait_for

# Every reason ingest may give a device's message; anything else (internal_error above
# all: an exception no check foresaw) fails the fuzz.
NAMED_REASONS = {
    "bad_json", "bad_schema", "bad_schema_version", "oversize", "too_deep", "bad_name",
    "bad_timestamp", "device_mismatch", "unknown_device", "bad_kind", "bad_topic",
    "bad_fleet", "bad_device", "bad_shape", "bad_dtype", "tensor_too_large", "bad_tensor",
    "non_finite", "bad_source", "label_not_allowed", "foreign_sample", "unknown_sample",
    "suppressed",
}  # fmt: skip
ACK_STATUSES = {"stored", "duplicate", "rejected", "retry"}
EXAMPLE_BOUND_S = 30.0  # one example's batch, at most (a hang fails here, not in CI's timeout)
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))


def valid_message(kind: str, fleet: str, device: str = "d1") -> dict:
    """A valid message of ``kind`` as raw JSON, stamped a few minutes ago."""
    now = (utcnow() - timedelta(minutes=5)).isoformat()
    envelope = {
        "schema_version": 1, "message_id": str(uuid.uuid4()), "fleet": fleet,
        "device_id": device, "sent_at": now,
    }  # fmt: skip
    body: dict = {
        "samples": {
            "window": {"dtype": "float32", "shape": [2, 2], "data": "AACAPwAAgD8AAIA/AACAPw=="},
            "channels": 2, "captured_at": now, "model_version": "v1", "predicted": "normal",
            "confidence": 0.5, "score": 0.1, "reasons": ["uncertain"],
        },
        "labels": {"sample_ids": [str(uuid.uuid4())], "label": "normal", "source": "device"},
        "heartbeat": {
            "model_version": "v1", "profile": "cpu-fp32", "buffer_depth": 3,
            "windows_seen": 10, "anomaly_rate": 0.1, "latency_ms_p50": 1.5,
            "capabilities": ["tuf", "package"],
        },
        "status": {
            "type": "status", "target_version": "v2", "status": "applied",
            "running_version": "v2", "payload": "delta", "received_bytes": 100,
        },
        "chunks": {"type": "chunks", "target": "t.edgepkg", "release": 1, "first": 0, "count": 4},
    }[kind]  # fmt: skip
    return {**envelope, **body}


MESSAGE_KINDS = ("samples", "labels", "heartbeat", "status", "chunks")
HOME_TOPIC = {"status": "update-status", "chunks": "update-status"}


def deep(depth: int, opener: str, closed: bool) -> str:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '"a":1' if opener == "{" else "1"
    if opener == "{":  # objects need keys at every level
        return '{"a":' * (depth - 1) + "{" + inner + "}" * depth if closed else '{"a":' * depth
    return opener * depth + inner + closer * depth if closed else opener * depth


def json_values():
    huge_numbers = st.sampled_from([10**400, -(10**4000), 1e308, -1e308, 5e-324, 2**63, -(2**64)])
    scalars = (
        st.none() | st.booleans() | st.integers() | huge_numbers
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50)
        | st.text(st.characters(categories=["Cc", "Cf", "Cs", "Co"]), min_size=1, max_size=8)
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=10,
    )


def payloads():
    """(message kind, topic kind, payload bytes): one fuzzed message."""
    kind = st.sampled_from(MESSAGE_KINDS)
    topic_kind = st.sampled_from(UPLINK_KINDS)
    mutation = st.one_of(
        st.tuples(st.just("valid")),
        st.tuples(st.just("drop"), st.integers(0, 30)),
        st.tuples(st.just("replace"), st.integers(0, 30), json_values()),
        st.tuples(st.just("extra"), st.text(max_size=10), json_values()),
        st.tuples(st.just("huge_string"), st.integers(0, 30), st.integers(1 << 10, 2 << 20)),
        st.tuples(
            st.just("deep_field"), st.integers(0, 30), st.integers(2, 100_000),
            st.sampled_from("[{"), st.booleans(),
        ),
        st.tuples(st.just("deep"), st.integers(2, 100_000), st.sampled_from("[{"), st.booleans()),
        st.tuples(st.just("raw"), st.binary(max_size=2000)),
        st.tuples(st.just("not_utf8"), st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"])),
        st.tuples(st.just("json"), json_values()),
        st.tuples(st.just("truncate"), st.integers(0, 400)),
    )  # fmt: skip
    return st.tuples(kind, topic_kind, mutation)


def build(case, fleet: str) -> tuple[str, bytes]:
    """The topic and payload of one fuzz case."""
    kind, topic_kind, mutation = case
    msg = valid_message(kind, fleet)
    if topic_kind == "match":  # the message's own topic (the examples below use it)
        topic_kind = HOME_TOPIC.get(kind, kind)
    name = topic(fleet, "d1", topic_kind)
    fields = sorted(msg)
    op, *args = mutation
    if op == "drop":
        msg.pop(fields[args[0] % len(fields)])
    elif op == "replace":
        msg[fields[args[0] % len(fields)]] = args[1]
    elif op == "extra":
        msg[args[0]] = args[1]
    elif op == "huge_string":
        msg[fields[args[0] % len(fields)]] = "x" * args[1]
    elif op == "deep_field":
        field, depth, opener, closed = args
        text = json.dumps({**msg, fields[field % len(fields)]: None})
        return name, text.replace("null", deep(depth, opener, closed), 1).encode()
    elif op == "deep":
        return name, deep(*args).encode()
    elif op == "raw":
        return name, args[0]
    elif op == "not_utf8":
        msg["predicted" if "predicted" in msg else "fleet"] = "ünïcödé"
        return name, json.dumps(msg, ensure_ascii=False).encode(args[0])
    elif op == "json":
        return name, json.dumps(args[0]).encode()
    elif op == "truncate":
        return name, json.dumps(msg).encode()[: args[0]]
    return name, json.dumps(msg).encode()


# Each mutation and each message kind at least once, on its own topic and on another.
EXAMPLES = [
    ("samples", "match", ("valid",)),
    ("labels", "match", ("valid",)),
    ("heartbeat", "match", ("valid",)),
    ("status", "match", ("valid",)),
    ("chunks", "match", ("valid",)),
    ("samples", "heartbeat", ("valid",)),
    ("heartbeat", "samples", ("valid",)),
    ("samples", "match", ("deep", 100_000, "[", False)),
    ("samples", "match", ("deep", 100_000, "{", True)),
    ("labels", "match", ("deep_field", 3, 100_000, "[", True)),
    ("heartbeat", "match", ("huge_string", 5, 2 << 20)),
    ("status", "match", ("replace", 4, 10**4000)),
    ("samples", "match", ("replace", 7, "a\u202eb")),  # predicted
    ("chunks", "match", ("not_utf8", "utf-16")),
    ("samples", "match", ("not_utf8", "latin-1")),
    ("labels", "match", ("raw", b"\xff\xfe\x00[[[{")),
    ("samples", "match", ("truncate", 100)),
    ("heartbeat", "match", ("drop", 0)),
]


def _run(ingestor: Ingestor, fleet: str, cases) -> list:
    """handle_batch on the cases' messages in a worker thread, bounded in time."""
    items = [build(case, fleet) for case in cases]
    pool = ThreadPoolExecutor(max_workers=1)
    try:  # a hang fails this example (TimeoutError) instead of stalling the suite
        receipts = pool.submit(ingestor.handle_batch, items).result(timeout=EXAMPLE_BOUND_S)
    finally:
        pool.shutdown(wait=False)
    assert len(receipts) == len(items)
    for r in receipts:
        assert r is None or (
            r.status in ACK_STATUSES and (r.reason is None or r.reason in NAMED_REASONS | {"quota"})
        )
    assert set(ingestor.counters.dead_letters) <= NAMED_REASONS, ingestor.counters.dead_letters
    return receipts


def _fuzz_ingestor(ingestor: Ingestor, sessions, fleet: str) -> None:
    @FUZZ
    @given(st.lists(payloads(), min_size=1, max_size=4))
    def one_batch(cases):
        _run(ingestor, fleet, cases)

    for case in EXAMPLES:
        one_batch = example([case])(one_batch)
    one_batch = example(EXAMPLES)(one_batch)  # all at once: one batch of every kind
    one_batch()

    with sessions() as s:
        reasons = set(s.scalars(select(DeadLetter.reason)))
    assert reasons <= NAMED_REASONS and "internal_error" not in reasons
    assert {"too_deep", "oversize", "bad_name"} <= set(ingestor.counters.dead_letters)
    good = sample_message(fleet, np.ones((32, 53), dtype=np.float32))
    assert ingestor.handle(topic(fleet, "d1", "samples"), good.encode()).status == "stored"


def _devices(pg_url, fleet):
    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    return sessions


def test_fuzzed_uplink_payloads_through_the_ingestor(tmp_path, pg_url, fleet):
    """Real PostgreSQL and a local object store: every fuzzed batch returns receipts with
    named reasons only, within the bound, and a valid sample is stored after the run."""
    sessions = _devices(pg_url, fleet)
    limits = IngestLimits(dead_letters_per_device_hour=50)  # the cap's path is fuzzed too
    _fuzz_ingestor(
        Ingestor(sessions=sessions, store=LocalObjectStore(tmp_path / "o"), limits=limits),
        sessions,
        fleet,
    )


def test_fuzzed_uplink_payloads_through_the_ingestor_on_s3(pg_url, s3_store, fleet):
    """The same on S3 (SeaweedFS): dead letters and windows go to a real object store."""
    sessions = _devices(pg_url, fleet)
    _fuzz_ingestor(Ingestor(sessions=sessions, store=s3_store), sessions, fleet)
    assert s3_store.list("dead-letters/")


def test_fuzzed_uplink_payloads_through_a_running_ingest_service(
    pg_url, s3_store, spare_broker, fleet
):
    """Published on Mosquitto to a running IngestService: after the run its worker is
    alive, every dead letter has a named reason, and a valid sample published last is
    stored. (A Mosquitto of the test's own, which queues 100,000 messages per client: with
    the default 1,000, a long run published faster than dead letters are written lost its
    tail in the broker, the last sample among it.)"""
    mqtt_port = spare_broker.port
    sessions = _devices(pg_url, fleet)
    service = IngestService(
        Ingestor(sessions=sessions, store=s3_store),
        host=HOST,
        port=mqtt_port,
        fleet=fleet,
        group=f"g{fleet}",
    )
    service.start()
    assert service.ready.wait(10)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-{fleet}")
    device.connect(HOST, mqtt_port)
    device.loop_start()
    published = 0
    try:

        @FUZZ
        @given(payloads())
        def publish(case):
            nonlocal published
            name, payload = build(case, fleet)
            device.publish(name, payload, qos=1).wait_for_publish(EXAMPLE_BOUND_S)
            published += 1

        for case in EXAMPLES:
            publish = example(case)(publish)
        publish()
        good = sample_message(fleet, np.ones((32, 53), dtype=np.float32))
        device.publish(topic(fleet, "d1", "samples"), good.encode(), qos=1).wait_for_publish(10)

        def landed() -> bool:
            with sessions() as s:
                return s.get(Sample, str(good.message_id)) is not None

        try:
            wait_for(landed, 120, what="the valid sample after the fuzz run")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; ingest health {service.health()}") from exc
        health = service.health()
        assert health["alive"] and health["workers_alive"] == health["workers"] == 1
        assert health["poison"] == 0
        assert set(service.ingestor.counters.dead_letters) <= NAMED_REASONS
        with sessions() as s:
            reasons = set(s.scalars(select(DeadLetter.reason)))
            letters = s.scalar(select(func.count()).select_from(DeadLetter))
        assert reasons <= NAMED_REASONS and "too_deep" in reasons
        print(f"{published} fuzzed messages published, {letters} dead letters, {sorted(reasons)}")
    finally:
        device.loop_stop()
        device.disconnect()
        service.stop()
