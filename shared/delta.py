"""The delta codec: a model package as a small patch against the package a device already
has; applying it gives the target bit for bit (its sha256 is the signed one).

A package is cut into tensors (each initializer's stored bytes, found by shared.onnxwire)
and "rest" (zip headers, manifest, graph structure): target = rest, tensor, rest, tensor…,
rest. The rest is zstd-coded against the base's rest (zstd's patch-from), so graph and
manifest edits cost only what changed. Each target tensor is coded, by the smallest
compressed size, as ``same`` (the base tensor of its name; nothing sent), ``dense`` (its
difference from it in the stored domain, shared.deltacoding), ``sparse`` (positions and
differences of the changed elements only) or ``full``. Bytes that are not a package
round-trip too: all of them are rest. The wire format is in shared.deltaformat.

No pickle anywhere: the header is JSON and tensors are raw bytes read with np.frombuffer,
so a delta from the network can describe data but never run code.
"""

from __future__ import annotations

import hashlib
import io
import struct
from typing import Any, BinaryIO, cast

import numpy as np
import zstandard as zstd

from shared.deltacoding import decode, payloads
from shared.deltaformat import (
    CHUNK,
    CODINGS,
    TENSOR_HASH_HEX,
    TENSOR_WINDOW_LOG,
    DeltaError,
    DeltaHeader,
    Segment,
    fail,
    pack,
    read_exact,
    read_header,
    sha_hex,
)
from shared.messages import MAX_PACKAGE_BYTES
from shared.onnxwire import TensorRange, tensor_ranges

__all__ = ["DeltaError", "DeltaHeader", "apply", "apply_bytes", "encode", "read_header", "stats"]


def _rest(data: bytes, tensors: list[tuple[int, int]]) -> bytes:
    parts, pos = [], 0
    for off, n in tensors:
        parts.append(data[pos:off])
        pos = off + n
    parts.append(data[pos:])
    return b"".join(parts)


def _compressor(
    level: int, size: int, *, window_log: int = 0, dict_data: zstd.ZstdCompressionDict | None = None
) -> zstd.ZstdCompressor:
    params = zstd.ZstdCompressionParameters.from_level(
        level, source_size=size, write_checksum=True, write_content_size=True
    )
    if window_log or params.window_log > TENSOR_WINDOW_LOG:
        params = zstd.ZstdCompressionParameters.from_level(
            level,
            source_size=size,
            window_log=window_log or TENSOR_WINDOW_LOG,
            write_checksum=True,
            write_content_size=True,
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


def _choose(old: bytes | None, data: bytes, itemsize: int, level: int) -> tuple[str, str, bytes]:
    """The (coding, transform, payload) whose payload compresses smallest on its own."""
    tries = payloads(old, data, itemsize)
    sizes = [0 if c == "same" else len(_compressor(level, len(p)).compress(p)) for c, _, p in tries]
    return tries[int(np.argmin(sizes))]


def encode(base: bytes, target: bytes, *, level: int = 19) -> bytes:
    """The delta that turns ``base`` into ``target``; any bytes work, packages work well."""
    base_t, target_t = tensor_ranges(base), tensor_ranges(target)
    by_name: dict[str, int] = {}
    for i, t in enumerate(base_t):
        by_name.setdefault(t.name, i)
    segments: list[Segment] = []
    chosen: list[bytes] = []
    pos = 0
    for t in target_t:
        data = target[t.offset : t.offset + t.length]
        i = by_name.get(t.name, -1)
        match: TensorRange | None = base_t[i] if i >= 0 else None
        if match is None or (match.length, match.data_type) != (t.length, t.data_type):
            i, match = -1, None
        old = base[match.offset : match.offset + match.length] if match else None
        coding, transform, payload = _choose(old, data, t.itemsize, level)
        segments.append(
            Segment(
                gap=t.offset - pos,
                length=t.length,
                base=i if coding != "full" else -1,
                itemsize=t.itemsize,
                coding=coding,
                transform=transform,
                raw_length=len(payload),
                sha256="" if coding == "same" else sha_hex(data)[:TENSOR_HASH_HEX],
            )
        )
        chosen.append(payload)
        pos = t.offset + t.length
    base_ranges = [(t.offset, t.length) for t in base_t]
    base_rest = _rest(base, base_ranges)
    rest = _rest(target, [(t.offset, t.length) for t in target_t])
    window = _rest_window_log(len(base_rest), len(rest))
    rest_frame = _compressor(
        level, len(rest), window_log=window, dict_data=_rest_dict(base_rest)
    ).compress(rest)
    # One frame for all payloads rather than one per tensor: on the TEP CNN with every
    # weight nudged (8 tensors changed) 90 710 bytes against 90 965, the per-frame headers
    # and tables saved; the window cap keeps the device's decoder at 8 MiB either way.
    body = b"".join(chosen)
    tensor_frame = _compressor(level, len(body)).compress(body)
    return pack(
        base=base,
        target=target,
        base_tensors=base_ranges,
        segments=segments,
        rest_frame=rest_frame,
        tensor_frame=tensor_frame,
    )


class _Bounded:
    """At most ``left`` bytes of ``stream``, each fed to ``digest`` as it is read."""

    def __init__(self, stream: BinaryIO, left: int, digest: Any) -> None:
        self.stream, self.left, self.digest = stream, left, digest

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        # In pieces: a declared length is only a bound; memory grows with what arrives.
        data = read_exact(self.stream, n) if n else b""
        self.left -= len(data)
        self.digest.update(data)
        return data

    def drain(self) -> int:
        total = 0
        while chunk := self.read(CHUNK):
            total += len(chunk)
        return total


def _stream_length(delta: BinaryIO, delta_length: int | None) -> int | None:
    """The delta's bytes from the stream's position on: as the caller says, or as seeking
    to the end finds; None for a stream that cannot tell (checked as it is read instead)."""
    if delta_length is not None:
        return delta_length
    try:
        if not delta.seekable():
            return None
        here = delta.tell()
        end = delta.seek(0, io.SEEK_END)
        delta.seek(here)
        return end - here
    except (OSError, AttributeError):
        return None


def _check_base(base: BinaryIO, header: DeltaHeader, expected: str | None) -> None:
    if expected is not None and expected != header.base_sha256:
        raise fail("delta_base_mismatch", "delta was made for another base than expected")
    digest, n = hashlib.sha256(), 0
    base.seek(0)
    while chunk := base.read(CHUNK):
        digest.update(chunk)
        n += len(chunk)
    if n != header.base_length or digest.hexdigest() != header.base_sha256:
        raise fail(
            "delta_base_mismatch",
            f"delta applies to base {header.base_sha256[:12]}…, not {digest.hexdigest()[:12]}…",
        )


def _read_into(stream: Any, n: int) -> bytearray:
    """Exactly ``n`` bytes or fewer at the end, read into one buffer (no joined copies)."""
    buf = bytearray(n)
    got = 0
    with memoryview(buf) as view:
        while got < n:
            k = stream.readinto(view[got : got + CHUNK])
            if not k:
                break
            got += k
    del buf[got:]
    return buf


def _read_at(stream: BinaryIO, offset: int, n: int) -> bytearray:
    stream.seek(offset)
    # n lies within the base, whose length and hash were checked
    data = _read_into(stream, n) if hasattr(stream, "readinto") else bytearray(stream.read(n))
    if len(data) != n:
        raise fail("delta_base_mismatch", "the base changed while the delta was applied")
    return data


def _frame_bytes(reader: Any, n: int) -> bytearray:
    """The next ``n`` bytes of a frame; n was checked against the header's bounds."""
    try:
        data = _read_into(reader, n)
    except zstd.ZstdError as exc:
        raise fail("delta_corrupt", f"delta body unreadable: {exc}") from exc
    if len(data) != n:
        raise fail("delta_corrupt", "a delta frame ends before its declared bytes")
    return data


def _frame_end(reader: Any) -> None:
    """The frame must end here, its checksum good, with no byte left over."""
    try:
        extra = reader.read(1)
    except zstd.ZstdError as exc:
        raise fail("delta_corrupt", f"delta body unreadable: {exc}") from exc
    if extra:
        raise fail("delta_corrupt", "a delta frame holds more than its header declares")


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
    """Write the delta's target to ``out`` and return its sha256; a bad delta raises
    DeltaError, never anything else.

    Refused before the first byte is written: a malformed header, a base (``base`` must
    seek) or an expected hash other than the header's, a target longer than
    ``max_target_bytes``, and a delta (read from ``delta``'s position on) shorter or longer
    than its header says, its length being ``delta_length`` or found by seeking. A stream
    that can do neither is checked as it is read, so write ``out`` to a temporary file.
    Then one tensor at a time is decoded, in a buffer holding the base tensor read by
    seek; each changed tensor's sha256 (from the header: the hash of its stored bytes,
    which the manifest's tensor_sha256 also records) is checked as it is written, an
    unchanged one is the base's (whose hash was checked), and the whole target's sha256
    and the delta's digest are checked at the end."""
    total = _stream_length(delta, delta_length)
    header = read_header(delta)
    # Size first: a delta that would expand past the signed length is a bomb, whatever
    # target it names.
    if header.target_length > max_target_bytes:
        raise fail(
            "delta_too_large",
            f"delta's target is {header.target_length} bytes; at most {max_target_bytes}",
        )
    if expected_target_sha256 is not None and expected_target_sha256 != header.target_sha256:
        raise fail("delta_hash_mismatch", "delta names another target than expected")
    if total is not None and total != header.delta_length + 32:
        raise fail(
            "delta_truncated",
            f"delta is {total} bytes; its header says {header.delta_length + 32}",
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
        raise fail("delta_corrupt", f"delta body is corrupt: {exc}") from exc


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
        raise fail("delta_truncated", "delta ends inside its rest frame")
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
        old = _read_at(base, *header.base_tensors[seg.base]) if seg.base >= 0 else None
        data: bytearray | memoryview
        if seg.coding == "same" and old is not None:
            data = old
        else:  # decoded in old's buffer; the payload is freed as soon as it is used
            data = decode(old, _frame_bytes(tensor_reader, seg.raw_length), seg).data
        del old
        if len(data) != seg.length:
            raise fail("delta_corrupt", "a delta tensor decodes to the wrong length")
        if seg.sha256 and sha_hex(data)[:TENSOR_HASH_HEX] != seg.sha256:
            raise fail("delta_hash_mismatch", "a tensor of the delta's target fails its sha256")
        out.write(data)
        written.update(data)
    emit_rest(rest_len)
    _frame_end(rest_reader)
    _frame_end(tensor_reader)
    if body.drain():
        raise fail("delta_corrupt", "bytes after the delta's tensor frame")
    trailer = read_exact(delta, 32)
    if len(trailer) != 32:
        raise fail("delta_truncated", "delta ends before its digest")
    if trailer != digest.digest():
        raise fail("delta_corrupt", "delta's digest does not match its bytes")
    if check_end and delta.read(1):
        raise fail("delta_truncated", "bytes after the delta's end")
    if written.hexdigest() != header.target_sha256:
        raise fail("delta_hash_mismatch", "the delta's result does not have the target's sha256")
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
