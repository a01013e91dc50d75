"""The wire contract: topics, messages and their validation."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from shared.errors import MessageError
from shared.messages import MAX_MESSAGE_BYTES, Ack, SampleMessage, Tensor, decode
from shared.topics import parse_topic, subscription, topic

from .conftest import sample_message


def sample(window: np.ndarray) -> SampleMessage:
    return sample_message("f1", window, score=-3.0, reasons=("uncertain",))


def test_topic_round_trip():
    """A topic built for a device parses back to the same fleet, device and kind."""
    t = topic("fleet-a", "plant.01", "samples")
    assert t == "edgeloop/v1/fleet-a/plant.01/samples"
    assert parse_topic(t) == ("fleet-a", "plant.01", "samples")
    assert subscription("acks", shared_group="ingest") == "$share/ingest/edgeloop/v1/+/+/acks"


@pytest.mark.parametrize(
    "bad",
    [
        "edgeloop/v1/f/d",
        "edgeloop/v2/f/d/samples",
        "edgeloop/v1/f/+/samples",
        "edgeloop/v1/f/d/unknown",
    ],
)
def test_bad_topics_are_refused(bad):
    """Wrong depth, version, wildcard names and unknown kinds raise MessageError."""
    with pytest.raises(MessageError):
        parse_topic(bad)


def test_sample_round_trip_keeps_bytes():
    """A window survives encode → decode bit for bit, as little-endian float32."""
    w = np.random.default_rng(0).normal(size=(32, 53)).astype(np.float32)
    msg = decode("samples", sample(w).encode())
    assert msg.window.to_array().tobytes() == w.tobytes()
    assert msg.window.dtype == "float32" and msg.window.shape == (32, 53)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.update(schema_version=2), "bad_schema_version"),
        (lambda d: d.update(message_id="not-a-uuid"), "bad_schema"),
        (lambda d: d["window"].update(shape=[31, 53]), "bad_shape"),
        (lambda d: d.update(sent_at="2026-01-01T00:00:00"), "bad_schema"),
        (lambda d: d.update(extra_field=1), "bad_schema"),
    ],
)
def test_malformed_samples_are_named(mutate, reason):
    """Each kind of malformed sample raises MessageError with its own reason."""
    w = np.zeros((32, 53), dtype=np.float32)
    data = json.loads(sample(w).encode())
    mutate(data)
    with pytest.raises(MessageError) as err:
        decode("samples", json.dumps(data).encode()).window.to_array()
    assert err.value.reason == reason


def test_non_finite_and_oversize_and_garbage():
    """NaN windows, oversize payloads and non-JSON bytes are refused with their reason."""
    w = np.zeros((32, 53), dtype=np.float32)
    w[3, 4] = np.nan
    with pytest.raises(MessageError) as err:
        decode("samples", sample(w).encode()).window.to_array()
    assert err.value.reason == "non_finite"
    with pytest.raises(MessageError) as err:
        decode("samples", b"{" + b" " * MAX_MESSAGE_BYTES + b"}")
    assert err.value.reason == "oversize"
    with pytest.raises(MessageError) as err:
        decode("samples", b"\x00\xffnot json")
    assert err.value.reason == "bad_json"


def test_pickle_dtype_cannot_go_on_the_wire():
    """Object arrays (which would need pickle) are refused before sending."""
    with pytest.raises(MessageError):
        Tensor.from_array(np.array([{"a": 1}], dtype=object))


def test_ack_lists_ids():
    """An ack carries the message ids it acknowledges."""
    ids = (uuid.uuid4(), uuid.uuid4())
    ack = decode("acks", Ack(fleet="f", device_id="d", acked_ids=ids, status="stored").encode())
    assert ack.acked_ids == ids
