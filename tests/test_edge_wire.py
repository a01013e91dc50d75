"""The edge agent's own sample encoder: the same bytes as the wire model's, and the same
refusals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from edge_agent.wire import SampleEncoder
from shared.errors import MessageError
from shared.messages import SampleMessage, Tensor, decode

SCORES = [0.0, 1.0, 0.1, 1e-7, 1.2345e-5, 3.3e-4, 12345.678, 1e15, 1e16, 2.5e21, -7.25, 1e-300]


def fields(rng: np.random.Generator, i: int) -> dict:
    window = rng.normal(scale=10.0 ** rng.integers(-3, 4), size=(32, 53)).astype(np.float32)
    tz = UTC if i % 3 else timezone(timedelta(hours=5, minutes=30))
    captured = datetime(2026, 11, 30, 12, 0, 0, (i * 7919) % 1_000_000 * (i % 4 != 0), tzinfo=tz)
    return {
        "message_id": uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | 7 << 76 | 2 << 62 | i),
        "window": window,
        "captured_at": captured,
        "model_version": f"v{i}",
        "predicted": ("normal", "idv_01", "näive-ünicode", 'quote"d')[i % 4],
        "confidence": float(rng.random()) if i % 5 else 1.0,
        "score": SCORES[i % len(SCORES)] * (1 + float(rng.random())),
        "reasons": (("uncertain",), ("faulty", "ood"), ())[i % 3],
        "sent_at": datetime(2026, 11, 30, 12, 0, 1, i % 2 * 123456, tzinfo=UTC),
    }


def pydantic_bytes(f: dict) -> bytes:
    return SampleMessage(
        message_id=f["message_id"],
        fleet="fleet-a",
        device_id="plant.01",
        sent_at=f["sent_at"],
        window=Tensor.from_array(f["window"]),
        channels=f["window"].shape[1],
        captured_at=f["captured_at"],
        model_version=f["model_version"],
        predicted=f["predicted"],
        confidence=f["confidence"],
        score=f["score"],
        reasons=f["reasons"],
    ).encode()


def test_same_bytes_as_the_wire_model():
    """Across windows, scores of every magnitude, time zones, microseconds or none, names
    that need escaping and every reason set, the encoder writes exactly the bytes that
    SampleMessage.encode() writes, and decode() gives the window back bit for bit."""
    rng = np.random.default_rng(0)
    encoder = SampleEncoder(fleet="fleet-a", device_id="plant.01")
    for i in range(200):
        f = fields(rng, i)
        raw = encoder.encode(**f)
        assert raw == pydantic_bytes(f), i
        assert decode("samples", raw).window.to_array().tobytes() == f["window"].tobytes()


def test_any_layout_of_the_window_encodes_as_float32():
    """A float64, strided or big-endian window goes out as its little-endian float32 copy."""
    w = np.random.default_rng(1).normal(size=(53, 32))
    encoder = SampleEncoder(fleet="f", device_id="d")
    expected = w.T.astype(np.float32)
    for variant in (w.T, w.T.astype(">f4"), np.asfortranarray(w.T.astype(np.float32))):
        f = fields(np.random.default_rng(2), 1) | {"window": variant}
        got = decode("samples", encoder.encode(**f)).window.to_array()
        assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "change",
    [
        {"score": float("nan")},
        {"score": float("inf")},
        {"confidence": 1.5},
        {"captured_at": datetime(2026, 11, 30, 12, 0)},  # naive
        {"predicted": "x" * 65},
        {"model_version": "v\x001"},
        {"reasons": ("bored",)},
        {"window": np.zeros((32,), dtype=np.float32)},
    ],
)
def test_refuses_what_the_wire_model_refuses(change):
    """What SampleMessage's validation refuses, the encoder refuses with MessageError."""
    f = fields(np.random.default_rng(3), 1) | change
    with pytest.raises(MessageError):
        SampleEncoder(fleet="f", device_id="d").encode(**f)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's error or numpy's
        pydantic_bytes(f)


def test_refuses_bad_device_names():
    """A fleet or device name the wire refuses is refused when the encoder is made."""
    with pytest.raises(MessageError):
        SampleEncoder(fleet="", device_id="d")
    with pytest.raises(MessageError):
        SampleEncoder(fleet="f", device_id="d" * 65)
