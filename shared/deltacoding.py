"""Stored-domain transforms of one tensor: what the delta codec tries, and how it decodes.

The difference of two versions of a tensor is taken where its bytes live: subtraction mod
256 for 1-byte codes (an INT8/UINT8 code moving ±1 becomes 01/FF), per-nibble subtraction
mod 16 for bytes that may pack two INT4 codes, XOR or integer difference of the bit patterns
for 2/4/8-byte elements (FP16/FP32 and wide integers). Bytes of equal significance are
stored together (byte planes), so zstd sees exponents apart from mantissa noise. Arrays are
only ever made with np.frombuffer from raw bytes (never pickle).
"""

from __future__ import annotations

import numpy as np

from shared.deltaformat import SPARSE_HEAD, UINT, Segment

STEP = 1 << 16  # elements per slice when decoding in place


def _planes(data: np.ndarray, itemsize: int) -> bytes:
    """Bytes of equal significance together: (n, s) → (s, n); exponents stay apart from noise."""
    return data.view(np.uint8).reshape(-1, itemsize).T.tobytes()


def _unplanes(data: bytes | bytearray, itemsize: int) -> np.ndarray:
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(planes.T).view(UINT[itemsize]).reshape(-1)


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
    return np.frombuffer(data, UINT[itemsize])


def payloads(base: bytes | None, target: bytes, itemsize: int) -> list[tuple[str, str, bytes]]:
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
            head = SPARSE_HEAD.pack(len(idx), width)
            body = _planes(gaps.astype(UINT[width]), width) + _planes(d[idx], itemsize)
            out.append(("sparse", transform, head + body))
    return out


def _unplane_into(payload: bytes | bytearray, s: int, out: np.ndarray, transform: str) -> None:
    """``out`` (elements) set to the payload's planes, or to itself combined with them by
    ``transform``, one slice at a time: no full-size transposed copy is ever made."""
    planes = np.frombuffer(payload, np.uint8).reshape(s, -1)
    if planes.shape[1] != out.size:
        raise ValueError("payload and tensor differ in length")
    for a in range(0, out.size, STEP):
        chunk = np.ascontiguousarray(planes[:, a : a + STEP].T).view(UINT[s]).reshape(-1)
        out[a : a + STEP] = (
            chunk if transform == "none" else _undiff(out[a : a + STEP], chunk, transform)
        )


def decode(base: bytearray | None, payload: bytes | bytearray, seg: Segment) -> np.ndarray:
    """The target tensor's bytes (a uint8 array) from its payload, made in ``base``'s own
    buffer where there is one: memory is the tensor and its payload, nothing more.
    ValueError on any inconsistency."""
    s = seg.itemsize
    if seg.coding == "full" or base is None:
        out = np.empty(len(payload) // s, UINT[s])
        _unplane_into(payload, s, out, "none")
        return out.view(np.uint8)
    b = np.frombuffer(base, UINT[s])  # writable: a bytearray
    if seg.coding == "dense":
        _unplane_into(payload, s, b, seg.transform)
        return b.view(np.uint8)
    k, width = SPARSE_HEAD.unpack_from(payload)
    if width not in (1, 2, 4) or len(payload) != SPARSE_HEAD.size + k * (width + s):
        raise ValueError("sparse payload of the wrong size")
    end = SPARSE_HEAD.size + k * width
    idx = np.cumsum(_unplanes(payload[SPARSE_HEAD.size : end], width), dtype=np.int64)
    if k and (idx[-1] >= len(b) or (k > 1 and np.any(np.diff(idx) <= 0))):
        raise ValueError("sparse positions out of range")
    b[idx] = _undiff(b[idx], _unplanes(payload[end:], s), seg.transform)
    return b.view(np.uint8)
