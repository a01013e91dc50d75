"""The delta's wire format (version 1): its header, every field checked before use.

All integers little-endian:

    b"ELDELTA" version(u8) header_len(u32) | header: zstd frame of canonical JSON |
    rest: one zstd frame, the base's rest bytes as raw-content dictionary |
    tensors: one zstd frame, every coded tensor payload back to back |
    sha256 of every byte before it (32 bytes)

The header JSON: ``base`` and ``target`` [sha256 hex, length]; ``base_tensors`` [gap from
the previous one's end, length] for each tensor of the base (the base without them is the
rest's dictionary); ``segments``, one per target tensor in file order, [gap of rest bytes
before it, length, base tensor index or -1, itemsize, coding, transform, payload length,
the first 16 hex digits of the tensor's sha256, or "" for ``same``]; ``rest`` and
``tensors``, the two frames' lengths. In ``segments`` an integer k stands for k unchanged
tensors that continue the base's order with the base's gaps and lengths.
The header is JSON, never pickle: a delta from the network describes data, it cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import zstandard as zstd

from shared import jsonguard
from shared.errors import PackageError
from shared.package import canonical_json

MAGIC = b"ELDELTA"
VERSION = 1
PREFIX = struct.Struct("<7sBI")
MAX_HEADER_BYTES = 1 << 20  # compressed and decompressed; 10k tensors need about 0.5 MiB
TENSOR_WINDOW_LOG = 23  # the tensor frame's window: a device's decoder holds at most 8 MiB
MAX_DELTA_BYTES = 1 << 40  # a sanity cap on every declared length (no 2**60 anything)
CHUNK = 1 << 20
# A changed tensor's check as it is written: the first 64 bits of its sha256. It only stops
# a bad delta early; the target's whole sha256 (signed) is the check that counts. Whole
# hashes cost 32 incompressible bytes a tensor: about 40% of a 2.5 KB sparse update.
TENSOR_HASH_HEX = 16
CODINGS = ("same", "dense", "sparse", "full")
TRANSFORMS = ("none", "sub", "sub4", "xor")
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SPARSE_HEAD = struct.Struct("<IB")  # changed elements k, width of the index gaps


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
    sha256: str  # 16 hex of the target tensor's; "" for ``same`` (the base's hash covers it)


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


def sha_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def max_raw(seg_length: int, itemsize: int, coding: str) -> int:
    """The longest payload a segment may declare: a sparse one lists at most every element
    (a ≤4-byte gap and its value each), the others exactly the tensor or nothing."""
    if coding == "same":
        return 0
    if coding == "sparse":
        return SPARSE_HEAD.size + (seg_length // itemsize) * (4 + itemsize)
    return seg_length


def _segment_table(segments: list[Segment], gaps: list[list[int]]) -> list[Any]:
    """The segments as the header lists them. A run of k unchanged tensors that continue
    the base's order with the base's gaps and lengths is the one integer k: most of a small
    update's tensors are such, and listing each cost ~5 bytes (a 70-tensor package's
    unchanged delta was 598 bytes where xdelta3 needs 121)."""
    out: list[Any] = []
    following = 0  # the base tensor after the last one a segment used
    for s in segments:
        if s.coding == "same" and s.base == following and [s.gap, s.length] == gaps[s.base]:
            if out and type(out[-1]) is int:
                out[-1] += 1
            else:
                out.append(1)
        else:
            out.append(
                [s.gap, s.length, s.base, s.itemsize, s.coding, s.transform, s.raw_length,
                 s.sha256]
            )  # fmt: skip
        if s.base >= 0:
            following = s.base + 1
    return out


def pack(
    *,
    base: bytes,
    target: bytes,
    base_tensors: list[tuple[int, int]],
    segments: list[Segment],
    rest_frame: bytes,
    tensor_frame: bytes,
) -> bytes:
    """The whole delta around its two frames: prefix, header, frames, digest."""
    ends = [0, *(o + n for o, n in base_tensors)][:-1]
    gaps = [[o - e, n] for (o, n), e in zip(base_tensors, ends, strict=True)]
    header = {
        "base": [sha_hex(base), len(base)],
        "target": [sha_hex(target), len(target)],
        # Gaps, not offsets: repeated layouts compress to almost nothing.
        "base_tensors": gaps,
        "segments": _segment_table(segments, gaps),
        "rest": len(rest_frame),
        "tensors": len(tensor_frame),
    }
    text = canonical_json(header)
    head = zstd.ZstdCompressor(level=19, write_checksum=True).compress(text)
    if max(len(text), len(head)) > MAX_HEADER_BYTES:  # apply would refuse it: never made
        raise fail(
            "delta_too_large",
            f"a delta of {len(segments)} tensors needs a {len(text)}-byte header; "
            f"the cap is {MAX_HEADER_BYTES} (send the package)",
        )
    delta = PREFIX.pack(MAGIC, VERSION, len(head)) + head + rest_frame + tensor_frame
    # The digest: any flipped bit anywhere is caught, even one zstd would decode the same.
    return delta + hashlib.sha256(delta).digest()


def fail(reason: str, message: str) -> DeltaError:
    return DeltaError(message, reason=reason)


def _int(value: Any, lo: int = 0, hi: int = MAX_DELTA_BYTES) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise fail("delta_corrupt", f"delta header holds {value!r} where an integer is due")
    return value


def _hex(value: Any, empty: bool = False, size: int = 64) -> str:
    if empty and value == "":
        return value
    if type(value) is not str or len(value) != size or value.strip("0123456789abcdef") != "":
        raise fail("delta_corrupt", "delta header holds a malformed sha256")
    return value


def read_exact(stream: BinaryIO, n: int) -> bytes:
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
        raise fail("delta_corrupt", "delta header has the wrong fields")
    for key in ("base", "target"):
        if type(raw[key]) is not list or len(raw[key]) != 2:
            raise fail("delta_corrupt", f"delta header's {key} is malformed")
    base_sha, base_len = _hex(raw["base"][0]), _int(raw["base"][1])
    target_sha, target_len = _hex(raw["target"][0]), _int(raw["target"][1])
    if type(raw["base_tensors"]) is not list or type(raw["segments"]) is not list:
        raise fail("delta_corrupt", "delta header's tables are malformed")
    base_tensors, pos = [], 0
    for item in raw["base_tensors"]:
        if type(item) is not list or len(item) != 2:
            raise fail("delta_corrupt", "delta header's base table is malformed")
        off, n = pos + _int(item[0], 0, base_len), _int(item[1], 1, base_len)
        if off + n > base_len:
            raise fail("delta_corrupt", "a base tensor lies past the base's end")
        base_tensors.append((off, n))
        pos = off + n
    segments, pos, following = [], 0, 0
    for item in raw["segments"]:
        if type(item) is int:  # a run of unchanged tensors in the base's layout
            for _ in range(_int(item, 1, len(base_tensors) - following)):
                gap = base_tensors[following][0] - (
                    base_tensors[following - 1][0] + base_tensors[following - 1][1]
                    if following
                    else 0
                )
                length = base_tensors[following][1]
                pos += gap + length
                if pos > target_len:
                    raise fail("delta_corrupt", "delta segments run past the target's length")
                segments.append(Segment(gap, length, following, 1, "same", "none", 0, ""))
                following += 1
            continue
        if type(item) is not list or len(item) != 8:
            raise fail("delta_corrupt", "delta header's segment table is malformed")
        gap, length = _int(item[0]), _int(item[1], 1)
        b, size = _int(item[2], -1, len(base_tensors) - 1), _int(item[3], 1, 8)
        coding, transform = item[4], item[5]
        ok = (
            size in UINT
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
            raise fail("delta_corrupt", f"delta segment {item[:6]!r} is inconsistent")
        raw_len = _int(item[6], 0, max_raw(length, size, coding))
        if coding == "same" and raw_len != 0 or coding in ("dense", "full") and raw_len != length:
            raise fail("delta_corrupt", "a delta segment's payload length is wrong")
        sha = _hex(item[7], empty=coding == "same", size=TENSOR_HASH_HEX)
        if (sha == "") != (coding == "same"):
            raise fail("delta_corrupt", "a delta segment lacks its hash")
        pos += gap + length
        if pos > target_len:
            raise fail("delta_corrupt", "delta segments run past the target's length")
        segments.append(Segment(gap, length, b, size, coding, transform, raw_len, sha))
        if b >= 0:
            following = b + 1
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
    prefix = read_exact(stream, PREFIX.size)
    if len(prefix) < PREFIX.size:
        raise fail("delta_truncated", "delta shorter than its prefix")
    magic, version, head_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise fail("delta_corrupt", "not an edgeloop delta (bad magic)")
    if version != VERSION:
        raise fail("delta_corrupt", f"delta format {version} is not supported")
    if not 0 < head_len <= MAX_HEADER_BYTES:
        raise fail("delta_corrupt", f"delta header claims {head_len} bytes")
    head = read_exact(stream, head_len)
    if len(head) < head_len:
        raise fail("delta_truncated", "delta ends inside its header")
    try:
        # Bounded read: a frame that claims more than the cap is refused, not allocated.
        reader = zstd.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=False)
        text = read_exact(reader, MAX_HEADER_BYTES + 1)
        if len(text) > MAX_HEADER_BYTES:
            raise fail("delta_too_large", "delta header expands past its cap")
        raw = jsonguard.loads_bounded(text, max_bytes=MAX_HEADER_BYTES)  # never RecursionError
    except (zstd.ZstdError, ValueError, RecursionError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise fail("delta_corrupt", f"delta header unreadable: {exc}") from exc
    return _parse(raw, prefix + head)
