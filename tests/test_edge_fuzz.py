"""The edge's decoders of bytes from outside, fuzzed: the JSON guard every one of them
parses through, model packages (zip bombs, huge declared sizes, crowded directories, deep
manifests), acks and updates on a running agent's own topics. Only named errors, each
example within a time bound, and the agent's threads keep serving after it.

Examples follow the Hypothesis profile (tests/conftest.py); deltas are fuzzed in
tests/test_delta.py and update messages, offered metadata and chunk requests in
tests/test_update_fuzz.py."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import uuid
import zipfile

import paho.mqtt.client as mqtt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared import jsonguard
from shared.errors import MessageError, PackageError
from shared.messages import MAX_UPDATE_MESSAGE_BYTES, Ack, decode
from shared.package import MAX_MANIFEST_BYTES, ModelPackage
from shared.topics import topic

from .conftest import HOST, make_agent, wait_for, windows_of

FUZZ = settings(deadline=None)  # examples: the profile; time is bounded by each test
PER_EXAMPLE_S = 2.0  # far above any honest decode here (milliseconds): a hang, not noise
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=16,
)
DEEP = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[" * 100_000,  # unclosed
    b'{"x": "' + b"[" * 100_000 + b'"}',  # brackets in a string: shallow, and valid
]


def _nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    return 0


def _bounded(call, *args, **kw):
    """``call(*args)``, asserting it returned or raised within PER_EXAMPLE_S."""
    t0 = time.perf_counter()
    try:
        return call(*args, **kw)
    finally:
        assert time.perf_counter() - t0 < PER_EXAMPLE_S, f"{call.__name__} took too long"


# -- the guard ----------------------------------------------------------------------------


@FUZZ
@given(JSON, st.sampled_from([None, 0, 2]))
def test_depth_is_the_parsers_nesting(value, indent):
    """The guard's depth of any JSON text, however it is laid out, is the nesting json
    parses out of it (brackets inside strings never count)."""
    raw = json.dumps(value, indent=indent).encode()
    assert jsonguard.depth(raw) == _nesting(json.loads(raw))
    assert jsonguard.loads_bounded(raw, max_bytes=len(raw), max_depth=_nesting(value)) == value


@FUZZ
@given(st.one_of(st.binary(max_size=500), st.sampled_from(DEEP)))
@example(b'"' + b"\\" * 3_000_001)  # an escape run with no end: the scan stays linear
@example(b'"\\' * 1_500_000)
def test_guard_answers_any_bytes_with_a_value_or_a_valueerror(raw):
    """Any bytes: a value, or a ValueError (the guard's JsonRefused, or json's own), in
    bounded time; never a RecursionError."""
    try:
        _bounded(jsonguard.loads_bounded, raw, max_bytes=4 << 20)
    except ValueError as exc:
        assert not isinstance(exc, jsonguard.JsonRefused) or exc.reason in ("too_deep", "oversize")


def test_deep_and_huge_json_is_refused_by_name_before_parsing():
    """100k levels of `[` or `{` are refused as too_deep, a text past the cap as oversize,
    both before json sees a byte (a few milliseconds)."""
    for raw in DEEP[:3]:
        with pytest.raises(jsonguard.JsonRefused) as err:
            _bounded(jsonguard.loads_bounded, raw, max_bytes=1 << 20)
        assert err.value.reason == "too_deep"
    assert jsonguard.loads_bounded(DEEP[3], max_bytes=1 << 20) == {"x": "[" * 100_000}
    with pytest.raises(jsonguard.JsonRefused) as err:
        jsonguard.loads_bounded(b"[" + b"1," * (1 << 20) + b"1]", max_bytes=1 << 20)
    assert err.value.reason == "oversize"


# -- packages -------------------------------------------------------------------------------


def _zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


def _parts(package: bytes) -> tuple[bytes, bytes]:
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        return zf.read("manifest.json"), zf.read("model.onnx")


def _refused(data: bytes) -> str:
    with pytest.raises(PackageError) as err:
        _bounded(ModelPackage, data)
    return err.value.reason


REASONS = ("corrupt_package", "bad_manifest", "sha_mismatch")


@FUZZ
@given(data=st.data())
def test_damaged_packages_are_refused_by_name(tiny_package, data):
    """A real package with a flipped bit, cut short, extended, or with its manifest
    replaced by any JSON (deep nesting included) or any bytes: it opens with the same
    manifest (a flip in the zip's slack), or is refused with a named reason."""
    pkg = tiny_package[0]
    manifest, graph = _parts(pkg)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "manifest", "bytes"]))
    if how == "flip":
        bad = bytearray(pkg)
        bad[data.draw(st.integers(0, len(pkg) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        damaged = bytes(bad)
    elif how == "cut":
        damaged = pkg[: data.draw(st.integers(0, len(pkg) - 1))]
    elif how == "extend":
        damaged = pkg + data.draw(st.binary(min_size=1, max_size=64))
    elif how == "manifest":
        text = data.draw(st.one_of(JSON.map(json.dumps), st.sampled_from(DEEP).map(bytes.decode)))
        damaged = _zip([("manifest.json", text.encode()), ("model.onnx", graph)])
    else:
        damaged = data.draw(st.binary(max_size=2000))
    try:
        opened = _bounded(ModelPackage, damaged)
    except PackageError as exc:
        assert exc.reason in REASONS, exc.reason
    else:
        assert opened.manifest.model_dump() == ModelPackage(pkg).manifest.model_dump()
        assert opened.graph == graph


def test_zip_bomb_is_refused_before_it_expands(tiny_package):
    """A manifest deflated from 256 MiB of zeros (a few hundred KiB on the wire) is refused
    as corrupt_package, and opening it allocates next to nothing."""
    _, graph = _parts(tiny_package[0])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("manifest.json", "w") as f:
            zero = bytes(1 << 20)
            for _ in range(256):
                f.write(zero)
        zf.writestr(zipfile.ZipInfo("model.onnx"), graph)
    bomb = out.getvalue()
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    try:
        assert _refused(bomb) == "corrupt_package"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(bomb) + (8 << 20)


@pytest.mark.parametrize("size", [MAX_MANIFEST_BYTES + 1, 0xFFFF_FFFE])
def test_huge_declared_sizes_are_refused_before_reading(tiny_package, size):
    """A stored manifest whose directory entry (and local header) claims more than its cap,
    up to 4 GiB, is refused before a byte of it is read."""
    pkg = bytearray(tiny_package[0])
    for sig, offsets in ((b"PK\x01\x02", (20, 24)), (b"PK\x03\x04", (18, 22))):
        at = bytes(pkg).index(sig)  # the manifest's: it comes first
        for off in offsets:
            pkg[at + off : at + off + 4] = size.to_bytes(4, "little")
    assert _refused(bytes(pkg)) == "corrupt_package"


def test_crowded_directory_is_refused_before_zipfile_reads_it():
    """A zip with 100 000 entries is refused from its end record: zipfile never builds
    100 000 entries in memory."""
    crowded = _zip([(f"e{i}", b"") for i in range(100_000)])
    tracemalloc.start()
    try:
        assert _refused(crowded) == "corrupt_package"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_deep_manifest_is_refused_as_bad_manifest(tiny_package):
    """A manifest nested 100k levels deep (inside its metadata, under the size cap) is a
    bad_manifest, never a RecursionError."""
    manifest, graph = _parts(tiny_package[0])
    head = manifest[: manifest.rindex(b"}")]
    deep = head + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert len(deep) < MAX_MANIFEST_BYTES
    assert _refused(_zip([("manifest.json", deep), ("model.onnx", graph)])) == "bad_manifest"


# -- acks and updates on a running agent ------------------------------------------------


def _payloads():
    typed = st.sampled_from(["offer", "chunk"]).flatmap(
        lambda kind: st.dictionaries(
            st.sampled_from(["fleet", "device_id", "acked_ids", "status", "reason", "target",
                             "release", "index", "data", "metadata", "schema_version"]),
            JSON,
            max_size=6,
        ).map(lambda d: json.dumps({**d, "type": kind}).encode())
    )  # fmt: skip
    return st.one_of(st.binary(max_size=400), JSON.map(lambda v: json.dumps(v).encode()), typed)


HUGE = b'{"acked_ids": ["' + b"0" * MAX_UPDATE_MESSAGE_BYTES + b'"]}'


def test_agent_survives_any_acks_and_updates(tmp_path, fleet, mqtt_port, tiny_package, tep_small):
    """Anything on a device's acks and updates topics is a MessageError or a message of
    that topic; after the fuzzing and a burst of deep and huge payloads through the real
    broker, the agent's network thread still takes a genuine ack (its buffer empties) and
    the updater thread is alive."""
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], device="d1")
    try:

        @FUZZ
        @given(st.sampled_from(["acks", "updates"]), _payloads())
        @example("acks", DEEP[0])
        @example("updates", DEEP[1])
        @example("acks", HUGE)
        def check(kind: str, raw: bytes) -> None:
            try:
                _bounded(agent.on_message, kind, raw)
            except MessageError as exc:
                assert exc.reason in ("bad_json", "bad_schema", "oversize", "bad_schema_version")

        check()
        # A sample waits for its ack while hostile payloads arrive over the broker.
        _, golden = tep_small
        upload = next(u for w in windows_of(golden, "idv_01", 20) if (u := agent.process(w)[1]))
        agent.sync()
        assert agent.backlog() == 1
        hostile = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"x-{uuid.uuid4()}")
        hostile.connect(HOST, mqtt_port)
        hostile.loop_start()
        for raw in [*DEEP, HUGE, b"\xff" * 100]:
            for kind in ("acks", "updates"):
                hostile.publish(topic(fleet, "d1", kind), raw, qos=1).wait_for_publish(10)
        ack = Ack(fleet=fleet, device_id="d1", acked_ids=(upload.message_id,), status="stored")
        hostile.publish(topic(fleet, "d1", "acks"), ack.encode(), qos=1).wait_for_publish(10)
        wait_for(lambda: agent.backlog() == 0, 20, what="the genuine ack")
        hostile.loop_stop()
        hostile.disconnect()
        assert agent.link.connected.is_set()
        assert agent.updates._thread.is_alive()
        assert decode("acks", ack.encode()).acked_ids == (upload.message_id,)
    finally:
        agent.stop()
