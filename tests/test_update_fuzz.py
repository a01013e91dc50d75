"""Every decoder issue 13 added that takes bytes from outside, fuzzed (random bytes, random
JSON, deep nesting, huge sizes): the update and update-status messages, the TUF metadata a
device reads from an offer, the rollout transport's chunk requests and the webhook's
payload. Each answers with a named error and the part that serves keeps serving."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud.rollout.transport import RolloutTransport
from cloud.rollout.webhook import Verifier, WebhookError, handle, sign
from shared.errors import EdgeloopError, MessageError
from shared.messages import MAX_UPDATE_MESSAGE_BYTES, decode
from shared.topics import topic
from shared.trust import DeviceTrust, UpdateRefused

from .test_transfer import FleetRepo

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))  # examples: the profile
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
DEEP = b"[" * 200_000 + b"]" * 200_000  # far past any parser's recursion
HUGE = b'{"type": "offer", "target": "' + b"x" * MAX_UPDATE_MESSAGE_BYTES + b'"}'


def payloads():
    """Raw bytes, JSON of any shape, and messages of the right type with fields replaced by
    anything."""
    typed = st.sampled_from(["offer", "chunk", "status", "chunks"]).flatmap(
        lambda kind: st.dictionaries(
            st.sampled_from(
                [
                    "fleet",
                    "device_id",
                    "target",
                    "release",
                    "first",
                    "count",
                    "index",
                    "data",
                    "sha256",
                    "metadata",
                    "length",
                    "chunk_size",
                    "status",
                    "target_version",
                    "schema_version",
                ]
            ),  # fmt: skip
            JSON,
            max_size=8,
        ).map(lambda d: json.dumps({**d, "type": kind}).encode())
    )
    return st.one_of(st.binary(max_size=400), JSON.map(lambda v: json.dumps(v).encode()), typed)


@pytest.mark.parametrize("kind", ["updates", "update-status", "samples", "heartbeat", "labels"])
def test_messages_decode_or_say_why(kind):
    """Whatever arrives on any topic (a device's updates, the cloud's update-status and
    upload topics) is a message of that topic or a MessageError with its reason — never
    another exception (deep nesting once escaped as a RecursionError, which would have
    stopped the ingest's batch over and over)."""

    @FUZZ
    @given(payloads())
    @example(DEEP)
    @example(HUGE)
    def check(raw: bytes) -> None:
        try:
            decode(kind, raw)
        except MessageError as exc:
            assert exc.reason in ("bad_json", "bad_schema", "oversize", "bad_schema_version")

    check()
    with pytest.raises(MessageError) as err:
        decode(kind, HUGE)
    assert err.value.reason == "oversize"
    with pytest.raises(MessageError) as err:
        decode(kind, DEEP)
    assert err.value.reason == "bad_json"


def test_offered_metadata_is_refused_by_name_and_changes_nothing_trusted(tmp_path, fleet):
    """An offer's metadata files replaced by anything (garbage, deep nesting, huge text, the
    JSON of another role) is refused with a named reason; what the device trusts is
    byte-for-byte what it was (a file the device does not read, such as a root it already
    trusts, changes nothing either), and the genuine release still resolves after."""
    from cloud.store.objects import LocalObjectStore

    from .conftest import wait_for  # noqa: F401 - keeps the fixtures' module loaded

    repo = FleetRepo(LocalObjectStore(tmp_path / "store"), fleet, tmp_path / "keys")
    repo.signer.publish([])
    trust = DeviceTrust(tmp_path / "trust", fleet=fleet, device_id="d1", profile="cpu-fp32")
    DeviceTrust.enroll(tmp_path / "trust", repo.root)
    genuine = repo.signer.bundle()
    assert trust.resolve(genuine) is None  # an empty release: nothing assigned, all verified
    before = {p.name: p.read_bytes() for p in (tmp_path / "trust").rglob("*") if p.is_file()}
    names = sorted(genuine)

    @FUZZ
    @given(st.sampled_from(names), st.one_of(st.text(max_size=300), JSON.map(json.dumps)))
    @example(names[0], DEEP.decode())
    @example(names[-1], "x" * (3 << 20))
    def check(name: str, text: str) -> None:
        try:
            trust.resolve({**genuine, name: text})
        except UpdateRefused as exc:
            assert exc.reason in ("bad_signature", "missing_metadata", "rollback_attack",
                                  "expired_metadata", "mix_and_match", "bad_hash",
                                  "endless_data")  # fmt: skip
        after = {p.name: p.read_bytes() for p in (tmp_path / "trust").rglob("*") if p.is_file()}
        assert after == before

    check()
    assert trust.resolve(genuine) is None  # the genuine release still verifies


def test_transport_answers_garbage_with_a_named_error_and_keeps_serving(s3_store, fleet):
    """Chunk requests of any shape are refused with an EdgeloopError (the network thread
    logs and counts them); a real request after them is answered."""
    transport = RolloutTransport(host="127.0.0.1", port=1, store=s3_store)  # never started
    published: list[str] = []

    def publish(topic_name: str, *_a, **_k) -> mqtt.MQTTMessageInfo:  # the broker's edge
        published.append(topic_name)
        return mqtt.MQTTMessageInfo(len(published))

    transport.client.publish = publish
    s3_store.put(f"packages/{fleet}/cpu-fp32/v1.edgepkg", b"p" * 200_000)
    where = topic(fleet, "d1", "update-status")

    @FUZZ
    @given(payloads())
    @example(DEEP)
    @example(HUGE)
    def check(raw: bytes) -> None:
        with contextlib.suppress(EdgeloopError):
            transport.serve(where, raw)

    check()
    published.clear()
    good = json.dumps({  # from a device no fuzzed request named
        "type": "chunks", "fleet": fleet, "device_id": "d2", "release": 1,
        "target": "cpu-fp32/v1.edgepkg", "first": 0, "count": 3,
        "message_id": str(uuid.uuid4()), "sent_at": "2026-11-30T00:00:00Z",
    })  # fmt: skip
    sent = transport.serve(topic(fleet, "d2", "update-status"), good.encode())
    assert sent == 3 and len(published) == 3


def test_webhook_payloads_signed_but_malformed_get_a_400():
    """A delivery with a valid signature whose body is garbage, deeply nested or of the
    wrong shape is answered 400 (never a server error), and calls nothing."""
    secret = "fuzz-secret-0123456789abcdef"
    called: list[tuple] = []

    @FUZZ
    @given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode())))
    @example(DEEP[:60_000] + DEEP[-60_000:])
    @example(b'{"entity": "model_version_alias", "action": "created", "data": [1]}')
    def check(body: bytes) -> None:
        verifier = Verifier(secret)
        now = str(int(time.time()))
        delivery = str(uuid.uuid4())
        text = body.decode("utf-8", errors="replace")
        headers = {
            "X-MLflow-Signature": sign(secret, delivery, now, text),
            "X-MLflow-Delivery-Id": delivery,
            "X-MLflow-Timestamp": now,
        }
        try:
            answer = handle(verifier, lambda *a: called.append(a), headers, text.encode())
        except WebhookError as exc:
            assert 400 <= exc.status < 500
        else:
            assert answer["status"] in ("ignored", "queued")

    check()
    assert all(isinstance(c, tuple) and len(c) == 3 for c in called)
