"""Per-layer quantization of an exported ONNX graph, and the table of which layer got what.

Every MatMul/Gemm whose weight is a constant is one row: its module path (from the
exporter's scope names), its role (attention, ffn, router, other) and the scheme the
profile gives that role:

  int8  weights INT8 per channel, activations quantized per call (ORT dynamic quantization)
  int4  weights INT4 in blocks of 32 (ORT MatMulNBits), computed in FP32: weight-only
  fp16  weights stored FP16 and cast to FP32 once, at session load (CPU kernels are FP32)
  fp32  kept as is

``inspect_schemes`` reads the scheme of each weight back from a finished graph, so a test
can hold the table to what the bytes really contain.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCHEMES = ("fp32", "fp16", "int8", "int4")
ROLES = ("attention", "ffn", "router", "other")
INT4_BLOCK = 32

REASONS = {
    "int8": "INT8 weights and dynamic INT8 activations: 4x smaller, integer kernels",
    "int4": "INT4 weight-only in blocks of 32: FFN weights are most of the bytes",
    "fp16": "FP16 storage, cast to FP32 at load: half the bytes, FP32 arithmetic",
    "fp32": "kept FP32",
}
KEEP_REASONS = {
    "router": "kept FP32: expert routing is a discrete choice that rounding would flip",
    "other": "kept FP32: the profile keeps embedding and head exact",
}


@dataclass(frozen=True)
class QuantRow:
    weight: str  # the initializer's name in the exported graph
    module: str  # e.g. net.model.encoder.layers.0.self_attn.q_proj
    op: str  # MatMul or Gemm
    role: str
    scheme: str
    reason: str
    params: int
    bytes_fp32: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node came from, from its name (/a/b.0/c/MatMul): the TorchScript
    exporter names nodes so, and cloud.model.export gives dynamo-exported nodes the same form."""
    parts = [p for p in node.name.split("/") if p]
    return ".".join(parts[:-1])


def role_of(module: str) -> str:
    parts = module.split(".")
    if parts and parts[-1] == "gate" and "mlp" in parts:
        return "router"
    if any(p in ("self_attn", "attn", "attention") for p in parts):
        return "attention"
    if any(p in ("ff", "mlp", "experts", "shared_experts") for p in parts):
        return "ffn"
    return "other"


def plan_table(graph: bytes, schemes: dict[str, str]) -> list[QuantRow]:
    """One row per constant-weight MatMul/Gemm: what the profile's ``schemes`` (role →
    scheme) give it, and why. Roles the profile does not name stay FP32."""
    proto = split_gemms(onnx.load_from_string(graph))
    inits = {t.name: t for t in proto.graph.initializer}
    rows = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in inits:
            continue  # activation × activation (attention scores): nothing to quantize
        dims = list(inits[weight].dims)
        if len(dims) != 2:
            continue
        module = module_path(node)
        role = role_of(module)
        scheme = schemes.get(role, "fp32")
        reason = REASONS[scheme] if scheme != "fp32" else KEEP_REASONS.get(role, "kept FP32")
        if scheme == "int4" and dims[0] < INT4_BLOCK:
            scheme, reason = "int8", "INT8: the INT4 kernel needs a MatMul with K ≥ 32"
        params = int(np.prod(dims))
        rows.append(
            QuantRow(weight, module, node.op_type, role, scheme, reason, params, 4 * params)
        )
    return rows


def quantize(graph: bytes, rows: list[QuantRow]) -> bytes:
    """Apply the table: INT4 first (MatMulNBits), then FP16 storage, then INT8 dynamic."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addFilter(_QUIET)  # only while quantizing; another thread's records pass it
    try:
        return _quantize(graph, rows)
    finally:
        root.removeFilter(_QUIET)


class _QuietQuantizer(logging.Filter):
    """ORT's quantizer logs per node, and its advice to pre-process, on the root logger;
    this drops only those records (a filter, so other threads' logs are untouched)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "quantiz" in record.pathname)


_QUIET = _QuietQuantizer()


def _quantize(graph: bytes, rows: list[QuantRow]) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    proto = split_gemms(onnx.load_from_string(graph))
    by_weight = {r.weight: r.scheme for r in rows}
    names = {s: _nodes_for(proto, by_weight, s) for s in SCHEMES}
    if names["int4"]:
        quantizer = MatMulNBitsQuantizer(
            proto,
            block_size=INT4_BLOCK,
            is_symmetric=True,
            # nodes_to_include only adds to the op types it quantizes anyway: exclude the rest.
            nodes_to_exclude=[n for s, ns in names.items() if s != "int4" for n in ns]
            + _unplanned(proto, by_weight),
            algo_config=DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True),
        )
        quantizer.process()
        proto = quantizer.model.model
    if names["fp16"]:
        _store_fp16(proto, [w for w, s in by_weight.items() if s == "fp16"])
    if names["int8"]:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(proto, src)
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=names["int8"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            proto = onnx.load(dst)
    return proto.SerializeToString()


def split_gemms(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each Gemm with a constant weight as MatMul + Add (the same arithmetic), so
    that every layer can take any scheme: ORT's dynamic INT8 and its INT4 kernel both
    work on MatMul, and the dynamic quantizer leaves a Gemm in FP32."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA") or not plain:
            nodes.append(node)
            continue
        weight = inits[node.input[1]]
        if attrs.get("transB"):
            t = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), f"{weight.name}_t")
            proto.graph.initializer.remove(weight)
            proto.graph.initializer.append(t)
            inits[t.name] = t
            weight = t
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{out}_mm" if has_bias else out
        nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], weight.name], [mm_out], name=f"{node.name}_MatMul"
            )
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_Add")
            )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def _unplanned(proto: onnx.ModelProto, by_weight: dict[str, str]) -> list[str]:
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm") and (len(n.input) < 2 or n.input[1] not in by_weight)
    ]


def _nodes_for(proto: onnx.ModelProto, by_weight: dict[str, str], scheme: str) -> list[str]:
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and len(n.input) > 1
        and by_weight.get(n.input[1]) == scheme
    ]


def _store_fp16(proto: onnx.ModelProto, weights: list[str]) -> None:
    """Replace each weight by an FP16 initializer and a Cast back to FP32 in front of its
    consumers; ORT folds the Cast at session load, so inference runs FP32 kernels."""
    inits = {t.name: t for t in proto.graph.initializer}
    casts = []
    for name in weights:
        tensor = inits[name]
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16))
        half.name = f"{name}_fp16"
        proto.graph.initializer.remove(tensor)
        proto.graph.initializer.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [name], name=f"{name}_cast", to=onnx.TensorProto.FLOAT
            )
        )
    # Casts first: the graph must stay topologically sorted.
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(casts + nodes)


def inspect_schemes(graph: bytes, weights: list[str]) -> dict[str, str]:
    """What each original weight became in ``graph``, read from the bytes alone."""
    proto = onnx.load_from_string(graph)
    inits = {t.name: t for t in proto.graph.initializer}
    consumed = {i: n.op_type for n in proto.graph.node for i in n.input}
    out = {}
    for w in weights:
        if f"{w}_Q4" in consumed and consumed[f"{w}_Q4"] == "MatMulNBits":
            out[w] = "int4"
        elif f"{w}_quantized" in inits and inits[f"{w}_quantized"].data_type in (
            onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8,
        ):
            out[w] = "int8"
        elif f"{w}_fp16" in inits and inits[f"{w}_fp16"].data_type == onnx.TensorProto.FLOAT16:
            out[w] = "fp16"
        elif w in inits and inits[w].data_type == onnx.TensorProto.FLOAT:
            out[w] = "fp32"
        else:
            out[w] = "missing"
    return out


def format_table(rows: list[QuantRow]) -> str:
    head = "| module | op | role | scheme | params | why |\n|---|---|---|---|---:|---|"
    lines = [
        f"| {r.module} | {r.op} | {r.role} | {r.scheme} | {r.params} | {r.reason} |" for r in rows
    ]
    return "\n".join([head, *lines])
