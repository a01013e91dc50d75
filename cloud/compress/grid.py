"""Keeping a package's INT8 grid: a new student's weights written on the previous package's
per-channel scales and zero points, so only the codes of weights that really moved change.

Why: re-running ORT's quantizer on a retrained student moves 92-97% of the INT8 codes (new
per-channel scales, every weight a little different), and a binary delta of that saves only
1.2-1.4x. Here a code moves only where its weight left the old code's rounding cell by more
than ``margin`` steps, and at most a ``budget`` share of codes moves (the largest moves
win). Columns the old grid cannot hold (a weight far past 127 steps) and new head columns
(a new class) take ORT's fresh grid. The graph is ORT's for that student, byte for byte in
its structure: only initializer values differ, so the cloud evaluates the exact bytes a
device rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cloud.compress.quantization import QuantRow, quantize, split_gemms

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes (K, N), scale (N,), zero point (N,)


def int8_weights(graph: bytes) -> dict[str, Triple]:
    """Every weight ORT's dynamic quantizer stored as INT8 in ``graph``: its name (without
    the suffix) → (codes (K, N), per-column scale (N,), zero point (N,))."""
    inits = {t.name: t for t in onnx.load_from_string(graph).graph.initializer}
    out = {}
    for name, t in inits.items():
        if not name.endswith("_quantized") or t.data_type != onnx.TensorProto.INT8:
            continue
        w = name[: -len("_quantized")]
        if f"{w}_scale" in inits and f"{w}_zero_point" in inits:
            out[w] = (
                numpy_helper.to_array(t),
                numpy_helper.to_array(inits[f"{w}_scale"]),
                numpy_helper.to_array(inits[f"{w}_zero_point"]),
            )
    return out


@dataclass
class GridReport:
    """What keeping the grid did: codes on the old grid, how many moved, and the columns
    that had to take a fresh grid."""

    codes: int = 0  # codes on a kept grid
    changed: int = 0  # of those, how many differ from the previous package
    wanted: int = 0  # how many would move with plain rounding on the old grid
    regridded_columns: int = 0  # old columns the old grid could not hold
    clipped: int = 0  # weights past the grid's end (within the slack), clipped to it
    new_columns: int = 0  # columns the previous package did not have (new classes)
    fresh_tensors: list[str] = field(default_factory=list)  # no previous tensor to keep
    per_tensor: dict[str, list[int]] = field(default_factory=dict)  # name → [changed, codes]

    @property
    def changed_share(self) -> float:
        return self.changed / max(self.codes, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "codes": self.codes,
            "changed": self.changed,
            "changed_share": self.changed_share,
            "wanted": self.wanted,
            "regridded_columns": self.regridded_columns,
            "clipped": self.clipped,
            "new_columns": self.new_columns,
            "fresh_tensors": self.fresh_tensors,
        }


def requantize_on_grid(
    float_graph: bytes,
    rows: list[QuantRow],
    previous_graph: bytes,
    *,
    margin: float = 0.0,
    budget: float | None = None,
    slack: float = 2.0,
) -> tuple[bytes, GridReport]:
    """``float_graph`` quantized as ``rows`` say (ORT, for the graph's structure), with every
    INT8 weight that ``previous_graph`` holds under the same name written on the previous
    scales and zero points: a code moves only where ``|w/scale + zp − old code| > 0.5 +
    margin``, and with ``budget`` at most that share of all kept-grid codes moves (the
    largest moves first). A weight past the grid's end by at most ``slack`` steps is clipped
    to it; a column with one further out, and new columns, take ORT's fresh grid."""
    proto = onnx.load_from_string(quantize(float_graph, rows))
    floats = {
        t.name: numpy_helper.to_array(t).astype(np.float64)
        for t in split_gemms(onnx.load_from_string(float_graph)).graph.initializer
    }
    fresh = int8_weights(proto.SerializeToString())
    prev = int8_weights(previous_graph)
    report = GridReport()
    plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, (q_f, s_f, z_f) in fresh.items():
        old = prev.get(name)
        if old is None or name not in floats or old[0].shape[0] != q_f.shape[0]:
            report.fresh_tensors.append(name)
            continue
        q_o, s_o, z_o = old
        n_old = q_o.shape[1]
        if n_old > q_f.shape[1]:
            report.fresh_tensors.append(name)
            continue
        w = floats[name]  # (K, N)
        scale, zp = s_f.copy(), z_f.copy()
        scale[:n_old], zp[:n_old] = s_o, z_o
        u = w[:, :n_old] / s_o.astype(np.float64) + z_o  # real-valued codes on the old grid
        lo, hi = _code_range(q_o, z_o)
        fits = (u.min(axis=0) >= lo - 0.5 - slack) & (u.max(axis=0) <= hi + 0.5 + slack)
        report.clipped += int(((u < lo - 0.5) | (u > hi + 0.5))[:, fits].sum())
        keep = np.flatnonzero(fits)
        scale[:n_old][~fits] = s_f[:n_old][~fits]
        zp[:n_old][~fits] = z_f[:n_old][~fits]
        dist = np.abs(u - q_o)
        dist[:, ~fits] = 0.0
        proposal = np.clip(np.rint(u), lo, hi).astype(np.int8)
        plans[name] = (q_f, q_o, proposal, dist, keep)
        report.regridded_columns += int((~fits).sum())
        report.new_columns += q_f.shape[1] - n_old
        report.wanted += int((proposal[:, keep] != q_o[:, keep]).sum())
        report.codes += q_o.shape[0] * len(keep)
        _put(proto, f"{name}_scale", scale.astype(s_f.dtype))
        _put(proto, f"{name}_zero_point", zp.astype(z_f.dtype))
    threshold = 0.5 + margin
    if budget is not None and plans:
        moves = np.concatenate([d[d > threshold] for *_, d, _ in plans.values()])
        allowed = int(budget * report.codes)
        if len(moves) > allowed:
            # the allowed-th largest move: only moves beyond it are made
            cut = len(moves) - allowed - 1
            threshold = float(np.partition(moves, cut)[cut]) if allowed else np.inf
    for name, (q_f, q_o, proposal, dist, keep) in plans.items():
        codes = q_f.copy()  # new columns and regridded ones: ORT's fresh codes
        n_old = q_o.shape[1]
        move = dist > threshold
        kept = np.where(move, proposal, q_o)
        codes[:, keep] = kept[:, keep]
        changed = int((codes[:, :n_old][:, keep] != q_o[:, keep]).sum())
        report.changed += changed
        report.per_tensor[name] = [changed, q_o.shape[0] * len(keep)]
        _put(proto, f"{name}_quantized", codes)
    return proto.SerializeToString(), report


def _code_range(codes: np.ndarray, zp: np.ndarray) -> tuple[int, int]:
    """The codes ORT's symmetric INT8 uses ([-127, 127]) unless the tensor already holds
    -128 (an asymmetric grid)."""
    return (-128 if codes.min() < -127 or zp.any() else -127), 127


def _put(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Set initializer ``name`` to ``value``, left untouched when the values are the same and
    stored the way it was (raw bytes, or ORT's int32_data for small zero points): a tensor
    whose storage changed would cost the delta its whole size for nothing."""
    for t in proto.graph.initializer:
        if t.name != name:
            continue
        old = numpy_helper.to_array(t)
        if old.shape == value.shape and np.array_equal(old, value):
            return
        if t.HasField("raw_data"):
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
            t.CopyFrom(helper.make_tensor(name, dtype, value.shape, value.flatten().tolist()))
        return
    raise KeyError(name)
