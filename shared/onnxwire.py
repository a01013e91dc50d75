"""Where each ONNX weight's bytes lie inside a package, read from the wire format alone.

A device has no ``onnx`` package, so this walks the stored zip's local headers and the
protobuf varints by hand: ModelProto.graph is field 7, GraphProto.initializer field 5, and a
TensorProto holds dims (1), data_type (2), float_data (4, packed), name (8), raw_data (9),
double_data (10, packed). Only byte ranges come out; nothing is decoded into arrays.
Anything this walker does not understand yields no ranges, never an error: the delta codec
then treats those bytes as plain bytes, which still round-trips exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# ONNX TensorProto.DataType → bytes per stored element. Packed 4-bit types (UINT4/INT4,
# FLOAT4) and anything unknown count as 1: their bytes hold two codes each.
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
FLOAT, DOUBLE = 1, 11
_LOCAL = b"PK\x03\x04"


class WireError(ValueError):
    """The bytes are not the protobuf or zip this walker expects (internal: never escapes)."""


@dataclass(frozen=True)
class TensorRange:
    name: str
    data_type: int
    offset: int  # of the tensor's stored bytes within the whole package
    length: int

    @property
    def itemsize(self) -> int:
        size = ITEMSIZE.get(self.data_type, 1)
        return size if self.length % size == 0 else 1


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value or (offset, length)) for each field in [start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise WireError("truncated fixed field")
            yield field, wire, None
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError("truncated length-delimited field")
            yield field, wire, (pos, length)
            pos += length
        else:
            raise WireError(f"wire type {wire} (groups) not handled")


def _tensor(buf: bytes, start: int, end: int) -> TensorRange | None:
    name, data_type = "", 0
    raw: tuple[int, int] | None = None
    packed: tuple[int, int, int] | None = None
    for field, wire, value in _fields(buf, start, end):
        if field == 2 and wire == 0:
            data_type = int(value)
        elif field == 8 and wire == 2:
            off, n = value
            name = buf[off : off + n].decode("utf-8", "replace")
        elif field == 9 and wire == 2:
            raw = value
        elif field in (4, 10) and wire == 2:  # float_data / double_data, packed fixed-width
            packed = (FLOAT if field == 4 else DOUBLE, *value)
    if raw is not None and raw[1] > 0:
        return TensorRange(name, data_type, raw[0], raw[1])
    if raw is None and packed is not None and packed[2] > 0:
        return TensorRange(name, packed[0], packed[1], packed[2])
    return None


def _initializers(buf: bytes, start: int, end: int) -> list[TensorRange]:
    out = []
    for field, wire, value in _fields(buf, start, end):
        if field == 7 and wire == 2:  # ModelProto.graph
            g_off, g_len = value
            for f, w, v in _fields(buf, g_off, g_off + g_len):
                if f == 5 and w == 2:  # GraphProto.initializer
                    t = _tensor(buf, v[0], v[0] + v[1])
                    if t is not None:
                        out.append(t)
    return out


def tensor_ranges(package: bytes) -> list[TensorRange]:
    """The stored bytes of every initializer of each stored ``*.onnx`` entry, in file order;
    [] where the bytes are not a stored zip of ONNX graphs."""
    out: list[TensorRange] = []
    pos = 0
    try:
        while package[pos : pos + 4] == _LOCAL:
            flags, method = struct.unpack_from("<HH", package, pos + 6)
            (size,) = struct.unpack_from("<I", package, pos + 18)
            n_name, n_extra = struct.unpack_from("<HH", package, pos + 26)
            name = package[pos + 30 : pos + 30 + n_name]
            data = pos + 30 + n_name + n_extra
            if flags & 0x08 or data + size > len(package):
                break  # sizes in a data descriptor, or truncated: leave the rest as bytes
            if method == 0 and name.endswith(b".onnx"):
                out += _initializers(package, data, data + size)
            pos = data + size
    except (WireError, struct.error):
        return []
    return out
