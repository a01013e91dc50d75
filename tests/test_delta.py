"""The delta codec (shared.delta): exact round trips on real packages of every stored
scheme, sensible codings, bounded memory, and every damaged delta refused by name."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import tracemalloc

import numpy as np
import onnx
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from shared.delta import (
    DeltaError,
    apply,
    apply_bytes,
    encode,
    read_header,
    stats,
)
from shared.deltaformat import MAGIC, VERSION
from shared.package import InputSpec, Manifest, ModelPackage, build_package, sha256_hex

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))  # examples: the profile
REASONS = {
    "delta_base_mismatch",
    "delta_truncated",
    "delta_corrupt",
    "delta_too_large",
    "delta_hash_mismatch",
}


def _package(model, version: str, scheme: str, meta) -> bytes:
    """``model`` exported, quantized with ``scheme`` on every weight the profile table
    covers (as cloud.compress.pipeline does) and packaged."""
    from cloud.compress.quantization import plan_table, quantize
    from cloud.model.export import export_onnx, package_graph

    graph = export_onnx(model, meta.metadata["ood"])
    if scheme != "fp32":
        schemes = {"attention": scheme, "ffn": scheme, "other": scheme}
        graph = quantize(graph, plan_table(graph, schemes))
    return package_graph(
        graph,
        model,
        name=meta.name,
        version=version,
        parent="v1",
        profile=meta.profile,
        class_names=list(meta.class_names),
        metadata={"ood": meta.metadata["ood"]},
    )


@pytest.fixture(scope="module")
def packages(tiny_package, tep_small):
    """Real packages: the fixture's model, its head nudged, a few fine-tuning steps of the
    whole, and each of those as INT8, INT4 and FP16 graphs."""
    pkg, model = tiny_package
    meta = ModelPackage(pkg).manifest
    head = copy.deepcopy(model)
    with torch.no_grad():
        head.head.weight.add_(torch.randn_like(head.head.weight, generator=None) * 0.01)
    tuned = copy.deepcopy(model)
    data, _ = tep_small
    opt = torch.optim.SGD(tuned.parameters(), lr=1e-3)
    tuned.train()
    torch.manual_seed(0)
    for _ in range(2):
        opt.zero_grad()
        logits = tuned(torch.as_tensor(data.x[:32]))
        torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.y[:32])).backward()
        opt.step()
    tuned.eval()
    out = {"fp32-v1": pkg}
    for scheme in ("fp32", "int8", "int4", "fp16"):
        if scheme != "fp32":
            out[f"{scheme}-v1"] = _package(model, "v1", scheme, meta)
        out[f"{scheme}-head"] = _package(head, "v2", scheme, meta)
        out[f"{scheme}-tuned"] = _package(tuned, "v3", scheme, meta)
    return out


@pytest.fixture(scope="module")
def real_delta(packages):
    base, target = packages["int8-v1"], packages["int8-tuned"]
    return base, target, encode(base, target)


# --- round trips ----------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_real_pairs_round_trip(packages, data):
    """Any ordered pair of real packages (any schemes) gives back the target byte for byte."""
    # Prepare
    names = sorted(packages)
    base = packages[data.draw(st.sampled_from(names))]
    target = packages[data.draw(st.sampled_from(names))]
    # Execute
    delta = encode(base, target, level=3)
    # Assert
    assert apply_bytes(base, delta) == target


DTYPES = [np.int8, np.uint8, np.float16, np.float32, np.int32, np.int64, np.float64]


def _graph_package(tensors: dict[str, np.ndarray], version: str = "v1") -> bytes:
    """A package whose graph holds ``tensors`` as initializers (each passed through)."""
    inits = [numpy_helper.from_array(a, name) for name, a in tensors.items()]
    outputs = [
        helper.make_tensor_value_info(f"{n}_out", t.data_type, None)
        for n, t in zip(tensors, inits, strict=True)
    ]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in tensors]
    graph = helper.make_graph(nodes, "g", [], outputs, inits)
    raw = helper.make_model(graph).SerializeToString()
    manifest = Manifest(
        name="edgeloop.test.cpu-fp32",
        version=version,
        profile="cpu-fp32",
        input=InputSpec(window=4, channels=2),
        class_names=("normal", "fault"),
        graph_sha256=sha256_hex(raw),
    )
    return build_package(graph=raw, manifest=manifest)


@st.composite
def tensor_pairs(draw):
    """Base and target tensors of every stored dtype; the target changed sparsely, densely,
    by ±1 codes or packed INT4 nibbles, or not at all."""
    base, target = {}, {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for i, dtype in enumerate(DTYPES):
        n = draw(st.integers(1, 300))
        if np.issubdtype(dtype, np.floating):
            a = rng.normal(size=n).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(max(info.min, -1000), min(info.max, 1000), n, dtype=dtype)
        b = a.copy()
        kind = draw(st.sampled_from(["same", "sparse", "dense", "step", "nibble"]))
        if kind == "sparse":
            idx = rng.choice(n, size=max(1, n // 20), replace=False)
            b[idx] = a[::-1][idx]
        elif kind == "dense":
            b = (a * 3 + 1).astype(dtype) if dtype != np.uint8 else (a ^ 0x5A).astype(dtype)
        elif kind == "step":
            b = (a + rng.integers(-1, 2, n).astype(dtype)).astype(dtype)
        elif kind == "nibble" and dtype == np.uint8:
            lo = ((a & 15) + rng.integers(0, 2, n).astype(np.uint8)) & 15
            b = ((a & 0xF0) | lo).astype(np.uint8)
        base[f"w{i}"], target[f"w{i}"] = a, b
    return base, target


@FUZZ
@given(pair=tensor_pairs())
def test_every_dtype_round_trips(pair):
    """Random initializers of every stored dtype, changed in every way, come back exact."""
    # Prepare
    base, target = _graph_package(pair[0]), _graph_package(pair[1], "v2")
    # Execute
    delta = encode(base, target, level=3)
    # Assert
    assert apply_bytes(base, delta) == target


@FUZZ
@given(base=st.binary(max_size=3000), target=st.binary(max_size=3000))
def test_random_bytes_round_trip(base, target):
    """Bytes that are no package at all still round-trip (all of them are rest bytes)."""
    # Execute
    delta = encode(base, target, level=3)
    # Assert
    assert apply_bytes(base, delta) == target


# --- what the codec picks -----------------------------------------------------------------


def test_identical_package_costs_a_few_hundred_bytes(packages):
    """A package against itself: every tensor ``same``, the delta a few hundred bytes."""
    # Prepare
    pkg = packages["fp32-v1"]
    # Execute
    delta = encode(pkg, pkg)
    # Assert
    s = stats(delta)
    assert (
        s["tensors_same"] > 5 and s["tensors_dense"] + s["tensors_sparse"] + s["tensors_full"] == 0
    )
    # Every tensor in one run: the header lists them as one integer, not one by one.
    _, _, n = struct.unpack_from("<7sBI", delta)
    head = json.loads(zstandard.ZstdDecompressor().decompress(delta[12 : 12 + n]))
    assert head["segments"] == [s["tensors_same"]]
    assert len(delta) < 400


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4", "fp16"])
def test_head_only_change_keeps_every_other_tensor(packages, scheme):
    """Only the head changed: every other tensor is coded ``same``, and the delta is far
    smaller than zstd -19 of the target."""
    # Prepare
    base, target = packages[f"{scheme}-v1"], packages[f"{scheme}-head"]
    # Execute
    delta = encode(base, target)
    # Assert
    s = stats(delta)
    changed = s["tensors_dense"] + s["tensors_sparse"] + s["tensors_full"]
    assert 1 <= changed <= 2  # the head's weight, and its scale where it is quantized
    assert s["tensors_same"] >= 10
    assert len(delta) * 20 < len(zstandard.ZstdCompressor(level=19).compress(target))
    assert apply_bytes(base, delta) == target


def test_fine_tuned_delta_beats_zstd_of_the_target(packages):
    """A whole-model fine-tune still costs less than sending the target zstd -19."""
    # Prepare
    base, target = packages["fp32-v1"], packages["fp32-tuned"]
    # Execute
    delta = encode(base, target)
    # Assert
    assert len(delta) < len(zstandard.ZstdCompressor(level=19).compress(target))
    assert apply_bytes(base, delta) == target


def test_header_names_base_and_target(real_delta):
    """read_header gives the hashes and lengths the signed metadata binds."""
    # Prepare
    base, target, delta = real_delta
    # Execute
    header = read_header(delta)
    # Assert
    assert (header.base_sha256, header.base_length) == (sha256_hex(base), len(base))
    assert (header.target_sha256, header.target_length) == (sha256_hex(target), len(target))
    assert stats(delta)["total_bytes"] == len(delta)


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_apply_streams_with_bounded_memory(tmp_path, kind):
    """A 4 MB tensor with a few values changed (sparse) or all nudged (dense) is applied
    from files in under two tensors' worth of Python memory, not a package's worth
    (tracemalloc sees numpy's buffers and bytes; zstd's window is capped apart)."""
    # Prepare
    rng = np.random.default_rng(0)
    big = rng.normal(size=1 << 20).astype(np.float32)
    other = rng.normal(size=1 << 18).astype(np.float32)
    changed = big.copy()
    if kind == "sparse":
        changed[rng.choice(big.size, 10, replace=False)] += 1.0
    else:
        changed += (rng.normal(size=big.size) * 1e-4).astype(np.float32)
    base = _graph_package({"big": big, "other": other})
    target = _graph_package({"big": changed, "other": other}, "v2")
    delta = encode(base, target, level=3)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "delta").write_bytes(delta)
    # Execute
    with (
        (tmp_path / "base").open("rb") as b,
        (tmp_path / "delta").open("rb") as d,
        (tmp_path / "out").open("wb") as out,
    ):
        tracemalloc.start()
        digest = apply(base=b, delta=d, out=out, max_target_bytes=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Assert
    assert stats(delta)[f"tensors_{kind}"] == 1
    assert (tmp_path / "out").read_bytes() == target
    assert digest == sha256_hex(target)
    assert peak < 2 * big.nbytes + (1 << 20), peak
    assert len(target) > 5 * (1 << 20)


# --- refusals -------------------------------------------------------------------------------


def _refused(base: bytes, delta: bytes, **kw) -> str:
    out = io.BytesIO()
    with pytest.raises(DeltaError) as info:
        apply(
            base=io.BytesIO(base),
            delta=io.BytesIO(delta),
            out=out,
            max_target_bytes=kw.pop("max_target_bytes", 64 << 20),
            **kw,
        )
    assert info.value.reason in REASONS
    return info.value.reason


@settings(FUZZ)
@given(data=st.data())
def test_bit_flip_anywhere_is_refused(real_delta, data):
    """Any single flipped bit, anywhere in the delta, is refused with a named reason."""
    # Prepare
    base, _, delta = real_delta
    pos = data.draw(st.integers(0, len(delta) - 1))
    bad = bytearray(delta)
    bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    # Execute / Assert
    _refused(base, bytes(bad))


@settings(FUZZ)
@given(data=st.data())
def test_truncated_or_extended_delta_is_refused_before_writing(real_delta, data):
    """Any prefix, or the delta with bytes appended, is refused before a byte is written."""
    # Prepare
    base, _, delta = real_delta
    if data.draw(st.booleans()):
        bad = delta[: data.draw(st.integers(0, len(delta) - 1))]
    else:
        bad = delta + data.draw(st.binary(min_size=1, max_size=64))
    out = io.BytesIO()
    # Execute
    with pytest.raises(DeltaError) as info:
        apply(base=io.BytesIO(base), delta=io.BytesIO(bad), out=out, max_target_bytes=64 << 20)
    # Assert
    assert info.value.reason in ("delta_truncated", "delta_corrupt")
    assert out.getvalue() == b""


def test_foreign_delta_and_wrong_expectations_are_refused(packages, real_delta):
    """A delta for another base, or naming another base or target than the signed ones, is
    refused before writing, each with its reason."""
    # Prepare
    base, target, delta = real_delta
    other = packages["fp32-v1"]
    # Execute / Assert
    assert _refused(other, delta) == "delta_base_mismatch"
    assert _refused(base, delta, expected_base_sha256="0" * 64) == "delta_base_mismatch"
    assert _refused(base, delta, expected_target_sha256="0" * 64) == "delta_hash_mismatch"
    assert _refused(base, delta, max_target_bytes=len(target) - 1) == "delta_too_large"


def _forge(delta: bytes, edit) -> bytes:
    """``delta`` with its header JSON changed by ``edit`` (a valid frame and digest around it):
    what a careless or hostile encoder could send."""
    _, _, n = struct.unpack_from("<7sBI", delta)
    head = json.loads(zstandard.ZstdDecompressor().decompress(delta[12 : 12 + n]))
    body = delta[12 + n : -32]
    edit(head)
    frame = zstandard.ZstdCompressor().compress(json.dumps(head).encode())
    out = struct.pack("<7sBI", MAGIC, VERSION, len(frame)) + frame + body
    return out + hashlib.sha256(out).digest()


def _set(path: tuple, value):
    def edit(head):
        node = head
        for key in path[:-1]:
            if key == "changed":  # the first tensor that is not coded ``same``
                key = next(
                    i for i, seg in enumerate(node) if type(seg) is list and seg[4] != "same"
                )
            elif key == "listed":  # the first segment listed whole (not in a run of k)
                key = next(i for i, seg in enumerate(node) if type(seg) is list)
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("target", 1), 2**60, "delta_corrupt"),
        (("target", 1), 65 << 20, "delta_too_large"),
        (("segments", "listed", 6), 2**60, "delta_corrupt"),
        (("segments", "listed", 1), -4, "delta_corrupt"),
        (("rest",), 2**60, "delta_corrupt"),
        (("tensors",), 1 << 30, "delta_truncated"),
        (("base_tensors", 0, 1), 2**31, "delta_corrupt"),
        (("segments", "listed", 4), "pickle", "delta_corrupt"),
        (("segments",), [10**6], "delta_corrupt"),  # a run past the base's tensors
        (("segments",), [0], "delta_corrupt"),
        (("segments",), [True], "delta_corrupt"),
        (("segments", "changed", 7), "f" * 16, "delta_hash_mismatch"),
        (("segments", "changed", 7), "f" * 64, "delta_corrupt"),
    ],
)
def test_forged_headers_are_refused_quickly(real_delta, path, value, reason):
    """Headers claiming 2**60-byte targets or payloads, negative or inconsistent fields, a
    wrong tensor hash: each refused by name, without allocating what they claim."""
    # Prepare
    base, _, delta = real_delta
    bad = _forge(delta, _set(path, value))
    # Execute / Assert
    assert _refused(base, bad) == reason


def test_payload_expanding_past_its_declared_length_is_refused(real_delta):
    """A tensor frame that decompresses to more than the header declares (a bomb) is
    refused, never allocated: the reader stops at the declared length."""
    # Prepare
    base, _, delta = real_delta
    _, _, n = struct.unpack_from("<7sBI", delta)
    head = json.loads(zstandard.ZstdDecompressor().decompress(delta[12 : 12 + n]))
    rest = delta[12 + n : 12 + n + head["rest"]]
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (64 << 20))
    head["tensors"] = len(bomb)
    frame = zstandard.ZstdCompressor().compress(json.dumps(head).encode())
    out = struct.pack("<7sBI", MAGIC, VERSION, len(frame)) + frame + rest + bomb
    forged = out + hashlib.sha256(out).digest()
    # Execute / Assert
    tracemalloc.start()
    assert _refused(base, forged) in ("delta_corrupt", "delta_hash_mismatch")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 200_000 + b"]" * 200_000,  # past any parser's recursion
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'"' + b"x" * (2 << 20) + b'"',  # past the header's cap once decompressed
        b"\xff\xfe not json",
    ],
)
def test_deeply_nested_huge_or_garbled_headers_are_refused(real_delta, text):
    """A header frame holding deep nesting, a string past the cap or bytes that are not
    JSON: refused as delta_corrupt (or too large), never a RecursionError or a crash."""
    # Prepare
    base, _, _ = real_delta
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(text)
    out = struct.pack("<7sBI", MAGIC, VERSION, len(frame)) + frame
    forged = out + hashlib.sha256(out).digest()
    # Execute / Assert
    assert _refused(base, forged) in ("delta_corrupt", "delta_too_large")


def test_onnx_package_is_what_the_codec_walks(packages):
    """The walker finds every raw_data initializer the onnx package itself sees."""
    # Prepare
    from shared.onnxwire import tensor_ranges

    pkg = packages["int4-head"]
    graph = onnx.load_from_string(ModelPackage(pkg).graph)
    raw = {t.name: t.raw_data for t in graph.graph.initializer if t.raw_data}
    # Execute
    found = {t.name: pkg[t.offset : t.offset + t.length] for t in tensor_ranges(pkg)}
    # Assert
    assert {k: v for k, v in found.items() if k in raw} == raw
    assert set(raw) <= set(found)


def test_entropy_bound_counts_only_what_changed(packages):
    """The entropy bound: nothing for tensors that did not change, the head's values for a
    head-only change, and nibbles as the values of packed INT4 weights."""
    # Prepare
    from bench.entropy import entropy_bound_bytes

    base, target = packages["int4-v1"], packages["int4-head"]
    # Execute
    same = entropy_bound_bytes(base, base)
    head = entropy_bound_bytes(base, target)
    # Assert
    assert same["tensors"] == 0 and same["rest"] > 0
    changed = {r["name"]: r for r in head["per_tensor"] if r["k"]}
    assert changed and all("head" in name for name in changed)
    q4 = next(r for r in head["per_tensor"] if r["name"].endswith("_Q4"))
    assert q4["values"] == "nibbles"
    assert head["total"] == head["rest"] + head["tensors"]


class _Pipe(io.RawIOBase):
    """A delta arriving over a stream that cannot seek or tell its length."""

    def __init__(self, data: bytes) -> None:
        self.src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        chunk = self.src.read(min(len(buf), 4096))
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_apply_reads_unseekable_and_offset_streams(real_delta):
    """A delta from a pipe (no length known) or from the middle of a file both apply."""
    # Prepare
    base, target, delta = real_delta
    offset = io.BytesIO(b"junk" + delta)
    offset.seek(4)
    outs = [io.BytesIO(), io.BytesIO()]
    # Execute
    apply(base=io.BytesIO(base), delta=_Pipe(delta), out=outs[0], max_target_bytes=1 << 26)
    apply(base=io.BytesIO(base), delta=offset, out=outs[1], max_target_bytes=1 << 26)
    # Assert
    assert outs[0].getvalue() == target == outs[1].getvalue()


def test_truncated_pipe_is_refused(real_delta):
    """A pipe that ends early, or runs on past the delta, is refused by name."""
    # Prepare
    base, _, delta = real_delta
    # Execute / Assert
    for bad in (delta[:-1], delta[: len(delta) // 2], delta + b"x"):
        with pytest.raises(DeltaError) as info:
            apply(
                base=io.BytesIO(base), delta=_Pipe(bad), out=io.BytesIO(), max_target_bytes=1 << 26
            )
        assert info.value.reason in ("delta_truncated", "delta_corrupt")
