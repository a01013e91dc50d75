"""The entropy bound a delta is measured against (the delta issue's definition).

    python bench/entropy.py BASE_PACKAGE TARGET_PACKAGE

For every stored tensor of n values of which k changed: n·H₂(k/n) bits to say which changed,
plus k·Ĥ bits for their new values, Ĥ being the empirical order-0 entropy of the k
differences in the stored domain; the graph's non-weight bytes (the target's rest: zip
headers, manifest, graph structure) count at their zstd -19 size, on their own.

Values are the elements of the tensor's ONNX data type: 1-byte codes (INT8/UINT8) with
their difference mod 256; 2/4/8-byte elements (FP16/FP32/FP64, wide integers) as their bit
patterns XORed. Packed INT4 (the uint8 ``*_Q4`` initializers ORT's MatMulNBits writes, two
codes per byte, and ONNX's own UINT4/INT4 types) count nibbles as values, difference mod
16; any other uint8 tensor counts bytes (nothing in the bytes says they pack nibbles). A
target tensor with no base tensor of its name, type and length has all n values changed,
their "differences" being the values themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from shared.onnxwire import TensorRange, tensor_ranges

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_NIBBLE_TYPES = {21, 22}  # ONNX UINT4, INT4


def _packed_int4(t: TensorRange) -> bool:
    return t.data_type in _NIBBLE_TYPES or (t.data_type == 2 and t.name.endswith("_Q4"))


def _values(data: bytes, t: TensorRange) -> np.ndarray:
    raw = np.frombuffer(data, _UINT[t.itemsize])
    if _packed_int4(t):
        return np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)
    return raw


def _h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else float(-p * np.log2(p) - (1 - p) * np.log2(1 - p))


def _order0_bits(values: np.ndarray) -> float:
    """Empirical order-0 entropy (bits per value) of ``values``."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    p = counts / values.size
    return float(-(p * np.log2(p)).sum())


def _rest(data: bytes, tensors: list[TensorRange]) -> bytes:
    parts, pos = [], 0
    for t in tensors:
        parts.append(data[pos : t.offset])
        pos = t.offset + t.length
    return b"".join([*parts, data[pos:]])


def entropy_bound_bytes(base: bytes, target: bytes) -> dict[str, Any]:
    """The bound in bytes: ``total``, ``rest`` (zstd -19 of the target's non-weight bytes),
    ``tensors`` (their sum) and ``per_tensor`` (name, n, k, bits to say which, bits per new
    value Ĥ, bytes)."""
    base_t = {t.name: t for t in tensor_ranges(base)}
    target_t = tensor_ranges(target)
    rows: list[dict[str, Any]] = []
    for t in target_t:
        new = _values(target[t.offset : t.offset + t.length], t)
        old_t = base_t.get(t.name)
        if old_t is not None and (old_t.length, old_t.data_type) == (t.length, t.data_type):
            old = _values(base[old_t.offset : old_t.offset + old_t.length], t)
            mask = 15 if _packed_int4(t) else 255
            diff = new ^ old if t.itemsize > 1 else (new - old) & mask
            changed = diff[diff != 0]
        else:
            changed = new
        n, k = int(new.size), int(changed.size)
        which = n * _h2(k / n)
        h = _order0_bits(changed)
        rows.append(
            {
                "name": t.name,
                "n": n,
                "k": k,
                "values": "nibbles" if _packed_int4(t) else f"{t.itemsize}-byte",
                "which_bits": which,
                "bits_per_value": h,
                "bytes": (which + k * h) / 8,
            }
        )
    rest = len(zstandard.ZstdCompressor(level=19).compress(_rest(target, target_t)))
    tensors = sum(r["bytes"] for r in rows)
    return {"total": rest + tensors, "rest": rest, "tensors": tensors, "per_tensor": rows}


def main(argv: list[str]) -> None:
    base, target = (Path(p).read_bytes() for p in argv)
    bound = entropy_bound_bytes(base, target)
    for r in bound["per_tensor"]:
        print(f"{r['name']:40s} n={r['n']:8d} k={r['k']:8d} {r['bytes']:12.1f} B")
    print(f"rest (zstd -19) {bound['rest']} B; tensors {bound['tensors']:.0f} B")
    print(f"bound {bound['total']:.0f} B for a {len(target)} B target")


if __name__ == "__main__":
    main(sys.argv[1:])
