"""Delta-friendly recompression, the round's entry points: the student kept close to the
previous package in the stored domain (warm start from the previous student's codes, the
most salient weights free, the previous INT8 grid kept), so a device downloads a small
delta of the exact package the cloud evaluated; and the gate that tries rising shares of
free weights until one passes the round's check (recompress_gated).

Measured (bench/delta.py, docs/benchmarks.md): 1% of the INT8 weights free matched
unconstrained recompression's golden recall and old-class macro-F1 in most rounds at 30-50x
smaller updates; a hard new fault (idv_14) needed every weight free and three times the
epochs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud.compress.close_training import (
    CloseConfig,
    anchors,
    distill_close,
    head_path,
    movement_masks,
    saliency_masks,
    snap_to_codes,
)
from cloud.compress.grid import GridReport, requantize_on_grid
from cloud.compress.quantization import QuantRow, plan_table
from cloud.model.export import export_onnx, package_graph
from cloud.model.train import extend_classes
from cloud.model.transformer import SensorTransformer
from shared.package import ModelPackage


def delta_friendly_student(
    *,
    previous_student: SensorTransformer,
    previous_package: bytes,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    share: float | None,
    cfg: CloseConfig,
    saliency: str = "gradient",
) -> SensorTransformer:
    """The round's student, warm: ``previous_student`` with its head grown to ``n_classes``
    and its INT8-stored weights set to ``previous_package``'s codes (dequantized), distilled
    from ``teacher`` on ``x, y`` with only the ``share`` most salient of those weights free
    to move (None: all), the head always. ``saliency``: ``gradient`` (|gradient| × scale at
    the start) or ``movement`` (how far each weight moved, in code steps, when a copy with
    every weight free was trained first: twice the training)."""
    student = extend_classes(copy.deepcopy(previous_student), n_classes)
    assert isinstance(student, SensorTransformer)
    graph = ModelPackage(previous_package).graph
    pull = anchors(student, graph)
    snap_to_codes(pull)
    masks = None
    if share is not None and saliency == "movement":
        probe = copy.deepcopy(student)
        probe_pull = anchors(probe, graph)
        distill_close(probe, teacher, x, y, cfg, pull=probe_pull)
        masks = movement_masks(probe, pull, probe_pull, share)
    elif share is not None:
        masks = saliency_masks(student, teacher, x, y, pull, share, cfg)
    trainable = None
    if masks is not None:
        head_name = head_path(student)
        head = student.get_submodule(head_name)
        assert isinstance(head, nn.Linear)
        masks[id(head.weight)] = torch.ones_like(head.weight)
        # Only masked matrices and the head move: a weight no Linear holds (DeepSeek's
        # expert tensors) has no anchor, so training it would move every code it has.
        free = set(masks)
        trainable = lambda n, p: id(p) in free or n.startswith(head_name + ".")  # noqa: E731
    distill_close(student, teacher, x, y, cfg, pull=pull, masks=masks, trainable=trainable)
    return student


@dataclass
class CloseResult:
    package: bytes
    student: SensorTransformer  # the FP32 shadow the next round starts from
    grid: GridReport
    rows: list[QuantRow]


def recompress_close_to(
    *,
    previous_package: bytes,
    previous_student: SensorTransformer,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    version: str,
    parent: str | None,
    cfg: CloseConfig | None = None,
    share: float | None = None,
    saliency: str = "gradient",
    margin: float = 0.0,
    budget: float | None = None,
    student: SensorTransformer | None = None,
) -> CloseResult:
    """The round's package close to ``previous_package``: ``previous_student`` (the FP32
    model that package was quantized from; its head grown to ``class_names``) distilled
    from the round's ``teacher`` on ``x, y`` with the ``share`` most salient INT8 weights
    free (delta_friendly_student), then written on the previous grid (``margin``, ``budget``:
    requantize_on_grid's). The package keeps the previous manifest's name, profile and
    metadata. Pass ``student`` (already distilled) to only requantize it."""
    prev = ModelPackage(previous_package)
    meta = package_meta(prev)
    if student is None:
        student = delta_friendly_student(
            previous_student=previous_student, previous_package=previous_package,
            teacher=teacher, x=x, y=y, n_classes=len(class_names), share=share, saliency=saliency,
            cfg=cfg or CloseConfig(),
        )  # fmt: skip
    graph = export_onnx(student, meta.get("ood"))
    schemes = {r[2] for r in meta.get("compression", {}).get("quantization", [])}
    rows = rows_like(graph, meta)
    if schemes - {"int8", "fp32"}:
        raise ValueError(f"grid-kept requantization handles INT8 profiles only, not {schemes}")
    return on_grid(graph, student, rows, like=prev, previous_graph=prev.graph, meta=meta,
                   version=version, parent=parent, class_names=class_names, margin=margin,
                   budget=budget)  # fmt: skip


def on_grid(
    graph: bytes,
    model: SensorTransformer,
    rows: list[QuantRow],
    *,
    like: ModelPackage,
    previous_graph: bytes,
    meta: dict[str, Any],
    version: str,
    parent: str | None,
    class_names: list[str],
    margin: float = 0.0,
    budget: float | None = None,
) -> CloseResult:
    """``graph`` (``model``'s export) written on ``previous_graph``'s INT8 grid and packaged
    under ``like``'s name and profile with ``meta``: what every close strategy ships."""
    qgraph, report = requantize_on_grid(graph, rows, previous_graph, margin=margin, budget=budget)
    package = package_graph(
        qgraph,
        model,
        name=like.manifest.name,
        version=version,
        parent=parent,
        profile=like.manifest.profile,
        class_names=class_names,
        metadata=meta,
    )
    return CloseResult(package, model, report, rows)


def package_meta(package: ModelPackage) -> dict[str, Any]:
    """A package's metadata as a new package of the same lineage carries it."""
    meta = dict(package.manifest.metadata)
    meta.pop("model_config", None)
    return meta


def rows_like(graph: bytes, meta: dict[str, Any]) -> list[QuantRow]:
    """The previous package's quantization table applied to this graph: each weight the
    scheme the previous one recorded (the profile's, by role), by name."""
    recorded = {w: s for _, w, s in meta.get("compression", {}).get("quantization", [])}
    rows = plan_table(graph, {"attention": "int8", "ffn": "int8", "other": "int8"})
    return [replace(r, scheme=recorded.get(r.weight, r.scheme)) for r in rows]


# (share of INT8 weights free or None for all, epochs as a multiple of CloseConfig's, how
# the free weights are picked), in rising order of what a rung may change or cost. On TEP
# (docs/benchmarks.md) the first rung passed in most rounds; hard new faults needed more.
LADDER: tuple[tuple[float | None, int, str], ...] = (
    (0.01, 1, "gradient"), (0.03, 1, "gradient"), (0.1, 1, "gradient"), (0.3, 1, "gradient"),
    (None, 1, "gradient"), (0.3, 3, "gradient"), (None, 3, "gradient"),
)  # fmt: skip
# Movement-picked masks (saliency="movement": 10% and 30% between the gradient rungs) were
# measured too: on the quick bench's idv_14 round none passed where the gradient rungs
# failed, and they double a rung's training, so the ladder leaves them out.


@dataclass
class GateStep:
    share: float | None
    epochs: int
    saliency: str
    passed: bool
    changed_share: float


def recompress_gated(
    *,
    previous_package: bytes,
    previous_student: SensorTransformer,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    version: str,
    parent: str | None,
    accept: Callable[[bytes], bool],
    cfg: CloseConfig | None = None,
    ladder: tuple[tuple[float | None, int, str], ...] = LADDER,
) -> tuple[CloseResult | None, list[GateStep]]:
    """The first rung of ``ladder`` whose package ``accept`` passes, and every rung tried;
    None when none did (the round then ships its unconstrained package, and the next round
    starts from that one). ``accept`` is the round's check on its validation set, e.g.
    macro-F1 and new-fault recall within 1 pt of the unconstrained package's there: never
    the golden set."""
    cfg = cfg or CloseConfig()
    steps = []
    for share, times, saliency in ladder:
        out = recompress_close_to(
            previous_package=previous_package, previous_student=previous_student,
            teacher=teacher, x=x, y=y, class_names=class_names, version=version,
            parent=parent, cfg=replace(cfg, epochs=times * cfg.epochs), share=share,
            saliency=saliency,
        )  # fmt: skip
        ok = accept(out.package)
        steps.append(GateStep(share, times * cfg.epochs, saliency, ok, out.grid.changed_share))
        if ok:
            return out, steps
    return None, steps
