"""The delta codec: a model package as a small patch against the package a device already
has; applying it gives the target bit for bit (its sha256 is the signed one).

Format (version 1), all integers little-endian:

    b"ELDELTA" version(u8) header_len(u32) | header: zstd frame of canonical JSON |
    rest: one zstd frame, the base's rest bytes as raw-content dictionary |
    tensors: one zstd frame, every coded tensor payload back to back

A package is cut into tensors (each initializer's stored bytes, found by shared.onnxwire)
and "rest" (zip headers, manifest, graph structure): target = rest, tensor, rest, tensor…,
rest. The rest is zstd-coded against the base's rest (zstd's patch-from), so graph and
manifest edits cost only what changed. Each target tensor is coded, by the smallest
compressed size, as ``same`` (the base tensor of its name; nothing sent), ``dense`` (its
difference from it in the stored domain, byte planes separated), ``sparse`` (positions and
differences of the changed elements only) or ``full``. The stored-domain difference is
subtraction mod 256 for 1-byte codes (INT8/UINT8 ±1 becomes 01/FF), per-nibble subtraction
mod 16 for bytes that may pack two INT4 codes, XOR of the bit patterns for 2/4/8-byte
elements. Bytes that are not a package round-trip too: all of them are rest.

No pickle anywhere: the header is JSON and tensors are raw bytes read with np.frombuffer,
so a delta from the network can describe data but never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import numpy as np
import zstandard as zstd

from shared.errors import PackageError
from shared.messages import MAX_PACKAGE_BYTES
from shared.onnxwire import TensorRange, tensor_ranges
from shared.package import canonical_json

MAGIC = b"ELDELTA"
VERSION = 1
_PREFIX = struct.Struct("<7sBI")
MAX_HEADER_BYTES = 1 << 20  # compressed and decompressed; 10k tensors need about 0.5 MiB
TENSOR_WINDOW_LOG = 23  # the tensor frame's window: a device's decoder holds at most 8 MiB
MAX_DELTA_BYTES = 1 << 40  # a sanity cap on every declared length (no 2**60 anything)
CHUNK = 1 << 20
CODINGS = ("same", "dense", "sparse", "full")
TRANSFORMS = ("none", "sub", "sub4", "xor")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SPARSE_HEAD = struct.Struct("<IB")  # changed elements k, width of the index gaps


class DeltaError(PackageError):
    """A delta that cannot give its target; ``reason`` is one of delta_base_mismatch,
    delta_truncated, delta_corrupt, delta_too_large, delta_hash_mismatch."""

    reason = "delta_corrupt"


@dataclass(frozen=True)
class Segment:
    """One target tensor: ``gap`` rest bytes precede it (since the previous tensor's end)."""

    gap: int
    length: int
    base: int  # index into DeltaHeader.base_tensors, -1 for none
    itemsize: int
    coding: str
    transform: str
    raw_length: int  # its payload's bytes in the tensor frame, decompressed
    sha256: str  # of the target tensor bytes; "" for ``same`` (the base's hash covers it)


@dataclass(frozen=True)
class DeltaHeader:
    base_sha256: str
    base_length: int
    target_sha256: str
    target_length: int
    base_tensors: tuple[
        tuple[int, int], ...
    ] = ()  # (offset, length): the base minus them is its rest
    segments: tuple[Segment, ...] = ()
    rest_length: int = 0  # compressed bytes of the rest frame
    tensors_length: int = 0  # compressed bytes of the tensor frame
    header_length: int = 0  # bytes before the body: prefix and header frame
    raw: bytes = field(default=b"", repr=False)  # those bytes, the start of the delta's digest

    @property
    def delta_length(self) -> int:
        return self.header_length + self.rest_length + self.tensors_length


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --- stored-domain transforms -------------------------------------------------------------


def _planes(data: np.ndarray, itemsize: int) -> bytes:
    """Bytes of equal significance together: (n, s) → (s, n); exponents stay apart from noise."""
    return data.view(np.uint8).reshape(-1, itemsize).T.tobytes()


def _unplanes(data: bytes, itemsize: int) -> np.ndarray:
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(planes.T).view(_UINT[itemsize]).reshape(-1)


def _diff(base: np.ndarray, target: np.ndarray, transform: str) -> np.ndarray:
    if transform == "xor":
        return target ^ base
    if transform == "sub":
        return target - base  # unsigned: wraps mod 2**(8·itemsize)
    lo = ((target & 15) - (base & 15)) & 15
    return lo | (((target >> 4) - (base >> 4)) << 4)


def _undiff(base: np.ndarray, diff: np.ndarray, transform: str) -> np.ndarray:
    if transform == "xor":
        return base ^ diff
    if transform == "sub":
        return base + diff
    lo = ((base & 15) + (diff & 15)) & 15
    return lo | (((base >> 4) + (diff >> 4)) << 4)


def _words(data: bytes, itemsize: int) -> np.ndarray:
    return np.frombuffer(data, _UINT[itemsize])


def _payloads(base: bytes | None, target: bytes, itemsize: int) -> list[tuple[str, str, bytes]]:
    """Every (coding, transform, payload) worth trying for one tensor."""
    t = _words(target, itemsize)
    out = [("full", "none", _planes(t, itemsize))]
    if base is None:
        return out
    if base == target:
        return [("same", "none", b"")]
    b = _words(base, itemsize)
    # Wide elements try the integer difference of their bit patterns too: a float nudged
    # within its binade moves by a small integer, where XOR also flips the carried bits.
    for transform in ("xor", "sub") if itemsize > 1 else ("sub", "sub4"):
        d = _diff(b, t, transform)
        out.append(("dense", transform, _planes(d, itemsize)))
        idx = np.flatnonzero(d)
        if len(idx) <= len(t) // 2:
            gaps = np.diff(idx, prepend=0)
            width = 1 if gaps.max() < 256 else 2 if gaps.max() < 65536 else 4
            head = _SPARSE_HEAD.pack(len(idx), width)
            body = _planes(gaps.astype(_UINT[width]), width) + _planes(d[idx], itemsize)
            out.append(("sparse", transform, head + body))
    return out


def _decode(base: bytes | None, payload: bytes, seg: Segment) -> np.ndarray:
    """The target tensor's bytes (uint8) from its payload; ValueError on any inconsistency.
    No ``tobytes``: the result is written from the array, one copy of the tensor fewer."""
    s = seg.itemsize
    if seg.coding == "full" or base is None:
        return _unplanes(payload, s).view(np.uint8)
    b = _words(base, s)
    if seg.coding == "dense":
        return _undiff(b, _unplanes(payload, s), seg.transform).view(np.uint8)
    k, width = _SPARSE_HEAD.unpack_from(payload)
    if width not in (1, 2, 4) or len(payload) != _SPARSE_HEAD.size + k * (width + s):
        raise ValueError("sparse payload of the wrong size")
    end = _SPARSE_HEAD.size + k * width
    idx = np.cumsum(_unplanes(payload[_SPARSE_HEAD.size : end], width), dtype=np.int64)
    if k and (idx[-1] >= len(b) or (k > 1 and np.any(np.diff(idx) <= 0))):
        raise ValueError("sparse positions out of range")
    out = b.copy()
    out[idx] = _undiff(b[idx], _unplanes(payload[end:], s), seg.transform)
    return out.view(np.uint8)


def _max_raw(seg_length: int, itemsize: int, coding: str) -> int:
    if coding == "same":
        return 0
    if coding == "sparse":  # k ≤ n/2 elements, each a ≤4-byte gap and its value
        return _SPARSE_HEAD.size + (seg_length // itemsize) * (4 + itemsize)
    return seg_length


# --- encode -------------------------------------------------------------------------------


def _rest(data: bytes, tensors: list[tuple[int, int]]) -> bytes:
    parts, pos = [], 0
    for off, n in tensors:
        parts.append(data[pos:off])
        pos = off + n
    parts.append(data[pos:])
    return b"".join(parts)


def _compressor(level: int, size: int, dict_data: zstd.ZstdCompressionDict | None = None):
    params = zstd.ZstdCompressionParameters.from_level(
        level, source_size=size, write_checksum=True, write_content_size=True
    )
    return zstd.ZstdCompressor(compression_params=params, dict_data=dict_data)


def _rest_dict(base_rest: bytes) -> zstd.ZstdCompressionDict | None:
    # A raw-content dictionary: the target's rest may copy any run of the base's rest.
    if len(base_rest) < 8:
        return None
    return zstd.ZstdCompressionDict(base_rest, dict_type=zstd.DICT_TYPE_RAWCONTENT)


def _rest_window_log(base_rest_len: int, rest_len: int) -> int:
    """Big enough that every byte of the dictionary stays reachable (patch-from)."""
    return max(10, min(30, (base_rest_len + rest_len).bit_length() + 1))


def ends(ranges: list[tuple[int, int]]) -> list[int]:
    return [o + n for o, n in ranges]


def encode(base: bytes, target: bytes, *, level: int = 19) -> bytes:
    """The delta that turns ``base`` into ``target``; any bytes work, packages work well."""
    base_t = tensor_ranges(base)
    target_t = tensor_ranges(target)
    by_name: dict[str, int] = {}
    for i, t in enumerate(base_t):
        by_name.setdefault(t.name, i)
    segments, payloads, pos = [], [], 0
    for t in target_t:
        data = target[t.offset : t.offset + t.length]
        i = by_name.get(t.name, -1)
        match: TensorRange | None = base_t[i] if i >= 0 else None
        if match is None or (match.length, match.data_type) != (t.length, t.data_type):
            i, match = -1, None
        old = base[match.offset : match.offset + match.length] if match else None
        tries = _payloads(old, data, t.itemsize)
        sizes = [
            0 if c == "same" else len(_compressor(level, len(p)).compress(p)) for c, _, p in tries
        ]
        coding, transform, payload = tries[int(np.argmin(sizes))]
        segments.append(
            Segment(
                gap=t.offset - pos,
                length=t.length,
                base=i if coding != "full" else -1,
                itemsize=t.itemsize,
                coding=coding,
                transform=transform,
                raw_length=len(payload),
                sha256="" if coding == "same" else _sha(data),
            )
        )
        payloads.append(payload)
        pos = t.offset + t.length
    base_ranges = [(t.offset, t.length) for t in base_t]
    base_rest = _rest(base, base_ranges)
    rest = _rest(target, [(t.offset, t.length) for t in target_t])
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        source_size=len(rest),
        window_log=_rest_window_log(len(base_rest), len(rest)),
        write_checksum=True,
        write_content_size=True,
    )
    rest_frame = zstd.ZstdCompressor(
        compression_params=params, dict_data=_rest_dict(base_rest)
    ).compress(rest)
    body = b"".join(payloads)
    tparams = zstd.ZstdCompressionParameters.from_level(
        level, source_size=len(body), write_checksum=True, write_content_size=True
    )
    if tparams.window_log > TENSOR_WINDOW_LOG:
        tparams = zstd.ZstdCompressionParameters.from_level(
            level,
            source_size=len(body),
            window_log=TENSOR_WINDOW_LOG,
            write_checksum=True,
            write_content_size=True,
        )
    tensor_frame = zstd.ZstdCompressor(compression_params=tparams).compress(body)
    header = {
        "base": [_sha(base), len(base)],
        "target": [_sha(target), len(target)],
        # Gaps, not offsets: repeated layouts compress to almost nothing.
        "base_tensors": [
            [o - e, n] for (o, n), e in zip(base_ranges, [0, *ends(base_ranges)][:-1], strict=True)
        ],
        "segments": [
            [s.gap, s.length, s.base, s.itemsize, s.coding, s.transform, s.raw_length, s.sha256]
            for s in segments
        ],
        "rest": len(rest_frame),
        "tensors": len(tensor_frame),
    }
    head = zstd.ZstdCompressor(level=19, write_checksum=True).compress(canonical_json(header))
    delta = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + rest_frame + tensor_frame
    # The trailer: any flipped bit anywhere is caught, even one zstd would decode the same.
    return delta + hashlib.sha256(delta).digest()


# --- header -------------------------------------------------------------------------------


def _fail(reason: str, message: str) -> DeltaError:
    return DeltaError(message, reason=reason)


def _int(value: Any, lo: int = 0, hi: int = MAX_DELTA_BYTES) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail("delta_corrupt", f"delta header holds {value!r} where an integer is due")
    return value


def _hex(value: Any, empty: bool = False) -> str:
    if empty and value == "":
        return value
    if type(value) is not str or len(value) != 64 or value.strip("0123456789abcdef") != "":
        raise _fail("delta_corrupt", "delta header holds a malformed sha256")
    return value


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = stream.read(min(n - got, CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _parse(raw: dict[str, Any], head: bytes) -> DeltaHeader:
    if type(raw) is not dict or set(raw) != {
        "base", "target", "base_tensors", "segments", "rest", "tensors"
    }:  # fmt: skip
        raise _fail("delta_corrupt", "delta header has the wrong fields")
    for key in ("base", "target"):
        if type(raw[key]) is not list or len(raw[key]) != 2:
            raise _fail("delta_corrupt", f"delta header's {key} is malformed")
    base_sha, base_len = _hex(raw["base"][0]), _int(raw["base"][1])
    target_sha, target_len = _hex(raw["target"][0]), _int(raw["target"][1])
    if type(raw["base_tensors"]) is not list or type(raw["segments"]) is not list:
        raise _fail("delta_corrupt", "delta header's tables are malformed")
    base_tensors, pos = [], 0
    for item in raw["base_tensors"]:
        if type(item) is not list or len(item) != 2:
            raise _fail("delta_corrupt", "delta header's base table is malformed")
        off, n = pos + _int(item[0], 0, base_len), _int(item[1], 1, base_len)
        if off + n > base_len:
            raise _fail("delta_corrupt", "a base tensor lies past the base's end")
        base_tensors.append((off, n))
        pos = off + n
    segments, pos = [], 0
    for item in raw["segments"]:
        if type(item) is not list or len(item) != 8:
            raise _fail("delta_corrupt", "delta header's segment table is malformed")
        gap, length = _int(item[0]), _int(item[1], 1)
        b, size = _int(item[2], -1, len(base_tensors) - 1), _int(item[3], 1, 8)
        coding, transform = item[4], item[5]
        ok = (
            size in _UINT
            and length % size == 0
            and coding in CODINGS
            and transform in TRANSFORMS
            and (coding == "full") == (b < 0)
            and (transform == "none") == (coding in ("full", "same"))
            and (transform != "xor" or size > 1)
            and (transform != "sub4" or size == 1)
            and (b < 0 or base_tensors[b][1] == length)
        )
        if not ok:
            raise _fail("delta_corrupt", f"delta segment {item[:6]!r} is inconsistent")
        raw_len = _int(item[6], 0, _max_raw(length, size, coding))
        if coding == "same" and raw_len != 0 or coding in ("dense", "full") and raw_len != length:
            raise _fail("delta_corrupt", "a delta segment's payload length is wrong")
        sha = _hex(item[7], empty=coding == "same")
        if (sha == "") != (coding == "same"):
            raise _fail("delta_corrupt", "a delta segment lacks its hash")
        pos += gap + length
        if pos > target_len:
            raise _fail("delta_corrupt", "delta segments run past the target's length")
        segments.append(Segment(gap, length, b, size, coding, transform, raw_len, sha))
    return DeltaHeader(
        base_sha256=base_sha,
        base_length=base_len,
        target_sha256=target_sha,
        target_length=target_len,
        base_tensors=tuple(base_tensors),
        segments=tuple(segments),
        rest_length=_int(raw["rest"], 1),
        tensors_length=_int(raw["tensors"], 1),
        header_length=len(head),
        raw=head,
    )


def read_header(delta: bytes | BinaryIO) -> DeltaHeader:
    """The delta's header, every field checked (DeltaError says why); a stream is left
    positioned at the body."""
    stream = io.BytesIO(delta) if isinstance(delta, (bytes, bytearray, memoryview)) else delta
    prefix = _read_exact(stream, _PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise _fail("delta_truncated", "delta shorter than its prefix")
    magic, version, head_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise _fail("delta_corrupt", "not an edgeloop delta (bad magic)")
    if version != VERSION:
        raise _fail("delta_corrupt", f"delta format {version} is not supported")
    if not 0 < head_len <= MAX_HEADER_BYTES:
        raise _fail("delta_corrupt", f"delta header claims {head_len} bytes")
    head = _read_exact(stream, head_len)
    if len(head) < head_len:
        raise _fail("delta_truncated", "delta ends inside its header")
    try:
        # Bounded read: a frame that claims more than the cap is refused, not allocated.
        reader = zstd.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=False)
        text = _read_exact(reader, MAX_HEADER_BYTES + 1)
        if len(text) > MAX_HEADER_BYTES:
            raise _fail("delta_too_large", "delta header expands past its cap")
        raw = json.loads(text)
    except (zstd.ZstdError, ValueError, RecursionError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise _fail("delta_corrupt", f"delta header unreadable: {exc}") from exc
    return _parse(raw, prefix + head)


# --- apply --------------------------------------------------------------------------------


class _Bounded:
    """At most ``left`` bytes of ``stream``, each fed to ``digest`` as it is read."""

    def __init__(self, stream: BinaryIO, left: int, digest: Any) -> None:
        self.stream, self.left, self.digest = stream, left, digest

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n) if n else b""
        self.left -= len(data)
        self.digest.update(data)
        return data

    def drain(self) -> int:
        total = 0
        while chunk := self.read(CHUNK):
            total += len(chunk)
        return total


def _stream_length(delta: BinaryIO, delta_length: int | None) -> int | None:
    if delta_length is not None:
        return delta_length
    try:
        if not delta.seekable():
            return None
        here = delta.tell()
        end = delta.seek(0, io.SEEK_END)
        delta.seek(here)
        return end
    except (OSError, AttributeError):
        return None


def _check_base(base: BinaryIO, header: DeltaHeader, expected: str | None) -> None:
    if expected is not None and expected != header.base_sha256:
        raise _fail("delta_base_mismatch", "delta was made for another base than expected")
    digest, n = hashlib.sha256(), 0
    base.seek(0)
    while chunk := base.read(CHUNK):
        digest.update(chunk)
        n += len(chunk)
    if n != header.base_length or digest.hexdigest() != header.base_sha256:
        raise _fail(
            "delta_base_mismatch",
            f"delta applies to base {header.base_sha256[:12]}…, not {digest.hexdigest()[:12]}…",
        )


def _read_at(stream: BinaryIO, offset: int, n: int) -> bytes:
    stream.seek(offset)
    data = stream.read(n)  # n is within the base, whose length and hash were checked
    if len(data) < n:
        data += _read_exact(stream, n - len(data))
    if len(data) != n:
        raise _fail("delta_base_mismatch", "the base changed while the delta was applied")
    return data


def _frame_bytes(reader: Any, n: int) -> bytes:
    try:
        data = _read_exact(reader, n)
    except zstd.ZstdError as exc:
        raise _fail("delta_corrupt", f"delta body unreadable: {exc}") from exc
    if len(data) != n:
        raise _fail("delta_corrupt", "a delta frame ends before its declared bytes")
    return data


def _frame_end(reader: Any) -> None:
    """The frame must end here, its checksum good, with no byte left over."""
    try:
        extra = reader.read(1)
    except zstd.ZstdError as exc:
        raise _fail("delta_corrupt", f"delta body unreadable: {exc}") from exc
    if extra:
        raise _fail("delta_corrupt", "a delta frame holds more than its header declares")


def apply(
    *,
    base: BinaryIO,
    delta: BinaryIO,
    out: BinaryIO,
    max_target_bytes: int,
    expected_base_sha256: str | None = None,
    expected_target_sha256: str | None = None,
    delta_length: int | None = None,
) -> str:
    """Write the delta's target to ``out`` and return its sha256. Everything the header can
    be refused for is refused before the first byte is written; then one tensor at a time
    is decoded (the base tensor read by seek), its sha256 checked as it is written, and the
    whole target's at the end. A bad delta raises DeltaError, never anything else."""
    start = delta.tell() if delta.seekable() else 0
    total = _stream_length(delta, delta_length)
    header = read_header(delta)
    if expected_target_sha256 is not None and expected_target_sha256 != header.target_sha256:
        raise _fail("delta_hash_mismatch", "delta names another target than expected")
    if header.target_length > max_target_bytes:
        raise _fail(
            "delta_too_large",
            f"delta's target is {header.target_length} bytes; at most {max_target_bytes}",
        )
    if total is not None and total - start != header.delta_length + 32:
        raise _fail(
            "delta_truncated",
            f"delta is {total - start} bytes; its header says {header.delta_length + 32}",
        )
    _check_base(base, header, expected_base_sha256)
    base_rest = b"".join(
        _read_at(base, pos, off - pos)
        for pos, off in zip(
            [0, *(o + n for o, n in header.base_tensors)],
            [*(o for o, _ in header.base_tensors), header.base_length],
            strict=True,
        )
    )
    digest = hashlib.sha256(header.raw)
    try:
        return _write(header, base, delta, out, base_rest, digest, total is None)
    except DeltaError:
        raise
    except (zstd.ZstdError, ValueError, IndexError, TypeError, OverflowError, struct.error) as exc:
        raise _fail("delta_corrupt", f"delta body is corrupt: {exc}") from exc


def _write(
    header: DeltaHeader,
    base: BinaryIO,
    delta: BinaryIO,
    out: BinaryIO,
    base_rest: bytes,
    digest: Any,
    check_end: bool,
) -> str:
    rest_frame = _Bounded(delta, header.rest_length, digest).read()
    if len(rest_frame) != header.rest_length:
        raise _fail("delta_truncated", "delta ends inside its rest frame")
    rest_len = header.target_length - sum(s.gap + s.length for s in header.segments)
    rest_window = 1 << _rest_window_log(len(base_rest), rest_len)
    rest_reader = zstd.ZstdDecompressor(
        dict_data=_rest_dict(base_rest), max_window_size=rest_window
    ).stream_reader(io.BytesIO(rest_frame), read_across_frames=False)
    body = _Bounded(delta, header.tensors_length, digest)
    tensor_reader = zstd.ZstdDecompressor(max_window_size=1 << TENSOR_WINDOW_LOG).stream_reader(
        cast(BinaryIO, body),  # any object with read() will do (documented)
        read_across_frames=False,
    )
    written = hashlib.sha256()

    def emit_rest(n: int) -> None:
        while n > 0:
            data = _frame_bytes(rest_reader, min(n, CHUNK))
            out.write(data)
            written.update(data)
            n -= len(data)

    for seg in header.segments:
        emit_rest(seg.gap)
        payload = _frame_bytes(tensor_reader, seg.raw_length)
        old = _read_at(base, *header.base_tensors[seg.base]) if seg.base >= 0 else None
        data: bytes | memoryview = old if seg.coding == "same" and old is not None else b""
        if seg.coding != "same":
            data = _decode(old, payload, seg).data
            del old  # one tensor at a time
        if len(data) != seg.length:
            raise _fail("delta_corrupt", "a delta tensor decodes to the wrong length")
        if seg.sha256 and _sha(data) != seg.sha256:
            raise _fail("delta_hash_mismatch", "a tensor of the delta's target fails its sha256")
        out.write(data)
        written.update(data)
    emit_rest(rest_len)
    _frame_end(rest_reader)
    _frame_end(tensor_reader)
    if body.drain():
        raise _fail("delta_corrupt", "bytes after the delta's tensor frame")
    trailer = _read_exact(delta, 32)
    if len(trailer) != 32:
        raise _fail("delta_truncated", "delta ends before its digest")
    if trailer != digest.digest():
        raise _fail("delta_corrupt", "delta's digest does not match its bytes")
    if check_end and delta.read(1):
        raise _fail("delta_truncated", "bytes after the delta's end")
    if written.hexdigest() != header.target_sha256:
        raise _fail("delta_hash_mismatch", "the delta's result does not have the target's sha256")
    return written.hexdigest()


def apply_bytes(base: bytes, delta: bytes, *, max_target_bytes: int = MAX_PACKAGE_BYTES) -> bytes:
    """``apply`` in memory: the target's bytes."""
    out = io.BytesIO()
    apply(
        base=io.BytesIO(base),
        delta=io.BytesIO(delta),
        out=out,
        max_target_bytes=max_target_bytes,
        delta_length=len(delta),
    )
    return out.getvalue()


def stats(delta: bytes) -> dict[str, int]:
    """What the delta is made of: tensors per coding and their payload bytes, the rest and
    the whole (for benchmarks and MLflow)."""
    header = read_header(delta)
    out: dict[str, int] = {f"tensors_{c}": 0 for c in CODINGS}
    out |= {f"raw_bytes_{c}": 0 for c in CODINGS}
    for seg in header.segments:
        out[f"tensors_{seg.coding}"] += 1
        out[f"raw_bytes_{seg.coding}"] += seg.raw_length
    out |= {
        "header_bytes": header.header_length,
        "rest_bytes": header.rest_length,
        "tensor_bytes": header.tensors_length,
        "total_bytes": header.delta_length + 32,
        "target_bytes": header.target_length,
    }
    return out
