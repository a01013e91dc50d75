"""Low-rank adapters kept unmerged in the package: the base's stored INT8 codes never change,
so a round's delta is the adapters and the head; merged into a fresh base every N rounds.

Each nn.Linear of the student but the head becomes ``base(x) + B(A(x))`` (rank r, B zero at
the start, so a new adapter changes nothing). The base's weights are set to the previous
package's dequantized codes, so training sees the arithmetic a device runs, and are frozen;
only the adapters and the head (new classes need new rows) learn. In the graph the adapters
are two more MatMuls per layer, INT8 like the layer they sit beside; the base's initializers
keep the base package's names and bytes (tests hold that)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cloud.compress.close_training import CloseConfig, anchors, distill_close, head_path
from cloud.compress.delta_friendly import CloseResult, on_grid, package_meta, rows_like
from cloud.compress.quantization import plan_table
from cloud.model.export import export_onnx
from cloud.model.train import extend_classes
from cloud.model.transformer import SensorTransformer
from shared.package import ModelPackage


class LoRALinear(nn.Module):
    """``base(x) + lora_b(lora_a(x))``: the frozen layer and a rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_a.weight, std=base.in_features**-0.5)
        nn.init.zeros_(self.lora_b.weight)  # a new adapter changes nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))  # (..., out)


@torch.no_grad()
def grow_head(model: SensorTransformer, n_classes: int) -> SensorTransformer:
    """The head grown to ``n_classes`` in place (old rows kept; works with adapters in,
    where extend_classes's rebuild would not know the adapter modules)."""
    path = head_path(model)
    old = model.get_submodule(path)
    assert isinstance(old, nn.Linear)
    if old.out_features == n_classes:
        return model
    torch.manual_seed(n_classes)  # the new rows' initial weights, as extend_classes
    new = nn.Linear(old.in_features, n_classes)
    new.weight[: old.out_features] = old.weight
    new.bias[: old.out_features] = old.bias
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.cfg = replace(model.cfg, n_classes=n_classes)
    return model


def with_adapters(
    student: SensorTransformer, base_package: bytes, rank: int, n_classes: int
) -> SensorTransformer:
    """A copy of ``student`` (the plain FP32 model ``base_package`` was quantized from) with
    every Linear but the head on the package's dequantized codes and wrapped in an adapter,
    the head grown to ``n_classes``."""
    model = extend_classes(copy.deepcopy(student), n_classes)
    assert isinstance(model, SensorTransformer)
    head = head_path(model)
    with torch.no_grad():
        for a in anchors(model, ModelPackage(base_package).graph):
            a.param[: len(a.ref)] = a.ref  # the device's weights, exactly
    torch.manual_seed(rank)  # the adapters' initial weights, the same on every run
    targets = [k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k != head]
    for path in targets:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank))
    return model.eval()


def adapter_trainable(head: str) -> Any:
    """Only the adapters and the head learn."""
    return lambda name, _p: ".lora_" in name or name.startswith(head + ".")


@torch.no_grad()
def merge_adapters(model: SensorTransformer) -> SensorTransformer:
    """The plain model the adapters stand for: each base weight plus B·A."""
    merged = copy.deepcopy(model)
    for mod in list(merged.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.lora_b.weight @ child.lora_a.weight
                setattr(mod, child_name, child.base)
    return merged.eval()


def base_names(graph: bytes, base_meta: dict[str, Any]) -> dict[str, str]:
    """Initializer renames that give each base layer of an adapter graph the name its
    weight has in the base package (the exporter numbers constants in graph order, and
    the adapters shift the numbers); matched by module path, as the base manifest's
    quantization table records them."""
    recorded = {m: w for m, w, _ in base_meta.get("compression", {}).get("quantization", [])}
    rows = plan_table(graph, {"attention": "int8", "ffn": "int8", "other": "int8"})
    return {
        r.weight: recorded[r.module[: -len(".base")]]
        for r in rows
        if r.module.endswith(".base") and r.module[: -len(".base")] in recorded
    }


def rename_initializers(graph: bytes, names: dict[str, str]) -> bytes:
    proto = onnx.load_from_string(graph)
    for t in proto.graph.initializer:
        t.name = names.get(t.name, t.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
    return proto.SerializeToString()


def adapter_round(
    *,
    base_package: bytes,
    previous_package: bytes,
    model: SensorTransformer,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    version: str,
    parent: str | None,
    cfg: CloseConfig,
) -> CloseResult:
    """One round of unmerged adapters: ``model`` (with adapters, from with_adapters or the
    previous round) distilled from ``teacher``, then packaged with the base's codes and
    names untouched and the adapters and head on ``previous_package``'s grid."""
    grow_head(model, len(class_names))
    distill_close(model, teacher, x, y, cfg, trainable=adapter_trainable(head_path(model)))
    base = ModelPackage(base_package)
    meta = package_meta(base)
    graph = export_onnx(model, meta.get("ood"))
    graph = rename_initializers(graph, base_names(graph, meta))
    return on_grid(graph, model, rows_like(graph, meta), like=base,
                   previous_graph=ModelPackage(previous_package).graph, meta=meta,
                   version=version, parent=parent, class_names=class_names)  # fmt: skip
