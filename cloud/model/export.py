"""A trained model → the exact bytes a device runs: the ONNX graph with its anomaly scores
(EdgeGraph), compact names, and the canonical package with every hash."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from cloud.model.classifier import Classifier
from cloud.model.standardise import input_range
from shared.package import InputSpec, Manifest, build_package, sha256_hex

SCORE_OUTPUTS = ("energy", "confidence", "distance", "features")


class EdgeGraph(nn.Module):
    """The graph a device runs: the classifier plus its anomaly scores, computed by ONNX
    Runtime in the same call instead of in Python on every window (see
    edge_agent.scoring for the same scores in numpy, used for packages without them).

    Outputs: logits (B, K); energy = -logsumexp(logits) (B,); confidence = max softmax
    (B,); distance (B,) = mean squared z-score of the window's channel means and spreads
    against normal operation, over the calibrated threshold (over 1: out of distribution);
    features (B, 2C) = those channel means and spreads, which the device's diversity rule
    compares.
    """

    def __init__(self, model: Classifier, ood: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("f_mean", torch.tensor(ood["feature_mean"], dtype=torch.float32))
        self.register_buffer("f_std", torch.tensor(ood["feature_std"], dtype=torch.float32))
        self.threshold = float(ood["threshold"])

    f_mean: torch.Tensor  # (2C,) buffers: normal operation's feature statistics
    f_std: torch.Tensor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)  # (B, K)
        lse = torch.logsumexp(logits, dim=1)  # (B,)
        confidence = torch.exp(logits.max(dim=1).values - lse)
        mean = x.mean(dim=1)  # (B, C)
        spread = torch.sqrt(((x - mean[:, None, :]) ** 2).mean(dim=1))  # (B, C), two-pass
        features = torch.cat([mean, spread], dim=1)  # (B, 2C)
        z = (features - self.f_mean) / self.f_std
        distance = (z * z).mean(dim=1) / self.threshold
        return logits, -lse, confidence, distance, features


def export_onnx(model: Classifier, ood: dict[str, Any] | None = None) -> bytes:
    """ONNX bytes with a dynamic batch axis; with ``ood`` calibration the graph also
    outputs the anomaly scores (EdgeGraph). The TorchScript exporter gives stable bytes."""
    model.eval()
    module: nn.Module = model if ood is None else EdgeGraph(model, ood).eval()
    outputs = ["logits", *(SCORE_OUTPUTS if ood is not None else ())]
    dummy = torch.zeros(2, model.cfg.window, model.cfg.channels)
    exporter = model.exporter  # the model's backbone says which exporter handles it
    if exporter == "dynamo":
        # PatchTST's positional encoding does not trace with the TorchScript exporter; the
        # dynamo exporter handles it and writes the same bytes for the same weights too.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # It logs a warning per torchvision op it cannot register; we need none of them.
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module,
                (dummy,),
                input_names=["window"],
                output_names=outputs,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                opset_version=18,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        assert program is not None
        return _scoped_names(program.model_proto).SerializeToString()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it writes the same bytes for the same
        # weights (canonical packages) and it is the one that exports DeepSeek-V3 MoE.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (dummy,),
            buf,  # type: ignore[arg-type]  # a file object is accepted (and documented)
            input_names=["window"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["window", *outputs]},
            opset_version=17,
            dynamo=False,
        )
    if exporter != "torchscript+optimize":
        return buf.getvalue()
    # The TorchScript graph of a transformer carries long chains of shape arithmetic;
    # onnxscript's optimizer folds about half of its nodes away (same outputs, same bytes
    # for the same input).
    from onnxscript import optimizer

    return optimizer.optimize(onnx.load_from_string(buf.getvalue())).SerializeToString()


def compact_names(graph: bytes) -> bytes:
    """The graph a device gets: nodes and intermediate values renamed n0…, v0… and doc
    strings dropped. Exporters name them after module paths (about 10% of a small
    transformer's bytes); inputs, outputs and weights keep their names, and the
    package's report keeps the layer-by-layer table."""
    proto = onnx.load_from_string(graph)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in proto.graph.node for a in n.attribute):  # fmt: skip
        raise ValueError("compact_names handles flat graphs only; this one has subgraphs")
    keep = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    keep |= {t.name for t in proto.graph.initializer}
    rename: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
        for j, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = node.output[j] = f"v{len(rename)}"
    del proto.graph.value_info[:]
    proto.doc_string = ""
    return proto.SerializeToString()


def _scoped_names(proto: Any) -> Any:
    """Name each node after the module it came from, as the TorchScript exporter does
    (/model/net/…/q_proj/node_MatMul_38), and drop the dynamo exporter's per-node metadata
    (scopes, stack traces): it doubled the graph's size and a device has no use for it."""
    import ast

    for node in proto.graph.node:
        scopes: list[str] = next(
            (
                ast.literal_eval(p.value)
                for p in node.metadata_props
                if p.key.endswith("name_scopes")
            ),
            [],
        )
        module = scopes[-2] if len(scopes) >= 2 else ""
        if module:
            node.name = "/" + module.replace(".", "/") + "/" + node.name
        del node.metadata_props[:]
    return proto


def tensor_hashes(graph: bytes) -> dict[str, str]:
    proto = onnx.load_from_string(graph)
    return {
        t.name: sha256_hex(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
        for t in proto.graph.initializer
    }


def package_model(
    model: Classifier,
    *,
    name: str,
    version: str,
    parent: str | None,
    profile: str,
    class_names: list[str],
    metadata: dict[str, Any] | None = None,
    ood: dict[str, Any] | None = None,
) -> bytes:
    """The exact bytes a device will run: ONNX graph + manifest, canonical.

    ``ood``: calibration from ood_calibration(); the graph then computes the anomaly
    scores too, and the manifest keeps the calibration.
    """
    if len(class_names) != model.cfg.n_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.cfg.n_classes}-class model")
    metadata = {**(metadata or {}), **({"ood": ood} if ood is not None else {})}
    return package_graph(
        export_onnx(model, ood),
        model,
        name=name,
        version=version,
        parent=parent,
        profile=profile,
        class_names=class_names,
        metadata=metadata,
    )


def package_graph(
    graph: bytes,
    model: Classifier,
    *,
    name: str,
    version: str,
    parent: str | None,
    profile: str,
    class_names: list[str],
    metadata: dict[str, Any],
) -> bytes:
    """Package an exported (maybe quantized) graph of ``model``: compact names, manifest
    with every hash, canonical zip."""
    graph = compact_names(graph)
    manifest = Manifest(
        name=name,
        version=version,
        parent=parent,
        profile=profile,
        input=InputSpec(window=model.cfg.window, channels=model.cfg.channels),
        class_names=tuple(class_names),
        graph_sha256=sha256_hex(graph),
        tensor_sha256=tensor_hashes(graph),
        # input_range: the raw values this graph's standardisation keeps (never inherited).
        metadata={"model_config": asdict(model.cfg), **metadata, "input_range": input_range(model)},
    )
    return build_package(graph=graph, manifest=manifest)
