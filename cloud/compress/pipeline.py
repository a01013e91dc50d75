"""Teacher → edge package for one hardware profile: prune, distil, quantize, evaluate.

Three disjoint sets: the student trains on the training windows, the pipeline chooses
among the profile's student settings on the validation set (its macro-F1 against the
teacher's there), and the golden set only measures what is reported. The stages, each
measured on the golden set as an ONNX package under ONNX Runtime:

1. **Layer pruning** by block influence (ShortGPT): a block whose output is nearly its
   input (cosine similarity close to 1) changes little and goes first.
2. **FFN-channel pruning**: each FFN keeps its channels with the largest
   |activation| × ‖outgoing weights‖ (Wanda-style), experts each their own.
3. **Distillation** (recovery): the pruned student, initialised from the teacher's own
   layers, learns the teacher's temperature-softened logits plus the hard labels.
4. **Per-layer quantization** of the exported graph (cloud.compress.quantization).

The artifact evaluated is the package a device loads, byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.compress.distill import DistillConfig, distill
from cloud.compress.profiles import HardwareProfile
from cloud.compress.pruning import block_influence, ffn_importance, prune_ffn, prune_layers
from cloud.compress.quantization import QuantRow, plan_table, quantize
from cloud.model.checkpoint import from_bytes
from cloud.model.evaluation import ArtifactMetrics, evaluate_package
from cloud.model.export import export_onnx, package_graph
from cloud.model.transformer import SensorTransformer
from cloud.store.datasets import read_windows_file
from shared.errors import BudgetError, DataError
from shared.package import sha256_hex

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class Stage:
    name: str
    metrics: ArtifactMetrics


@dataclass
class Attempt:
    layers: int
    ffn_keep: float
    missed: list[str]  # budgets this setting missed, each with its figures
    metrics: ArtifactMetrics | None = None


@dataclass
class CompressionResult:
    profile: HardwareProfile
    package: bytes
    teacher: ArtifactMetrics  # on the golden set (reported)
    edge: ArtifactMetrics
    teacher_val: ArtifactMetrics  # on the validation set (what the choice was made on)
    edge_val: ArtifactMetrics
    stages: list[Stage]
    table: list[QuantRow]
    block_influence: list[float]
    kept_layers: list[int]
    removed_layers: list[int]
    attempts: list[Attempt] = field(default_factory=list)
    student: SensorTransformer | None = None

    @property
    def sha256(self) -> str:
        return sha256_hex(self.package)

    def summary(self) -> dict[str, Any]:
        t, e = self.teacher, self.edge
        return {
            "profile": self.profile.name,
            "backbone": self.student.cfg.backbone if self.student else None,
            "sha256": self.sha256,
            "teacher_bytes": t.package_bytes,
            "edge_bytes": e.package_bytes,
            "size_ratio": t.package_bytes / e.package_bytes,
            "teacher_latency_ms": t.latency_p50_ms,
            "edge_latency_ms": e.latency_p50_ms,
            "edge_latency_p99_ms": e.latency_p99_ms,
            "speedup": t.latency_p50_ms / e.latency_p50_ms,
            "teacher_macro_f1": t.macro_f1,
            "edge_macro_f1": e.macro_f1,
            "f1_drop_pts": 100 * (t.macro_f1 - e.macro_f1),
            "val_f1_drop_pts": 100 * (self.teacher_val.macro_f1 - self.edge_val.macro_f1),
            "edge_peak_rss_mb": e.peak_rss_mb,
            "kept_layers": self.kept_layers,
            "removed_layers": self.removed_layers,
            "block_influence": [round(b, 5) for b in self.block_influence],
            "stages": {s.name: s.metrics.summary() for s in self.stages},
            "edge_recall": e.recall,
        }


@dataclass
class Inputs:
    """What `edgeloop compress` reads: the teacher, its training windows, the validation
    set the student is chosen on, the golden set it is reported on."""

    teacher: SensorTransformer
    class_names: list[str]
    x: np.ndarray
    y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    golden_x: np.ndarray
    golden_y: np.ndarray


def read_inputs(*, teacher: Path, data: Path, validation: Path, golden: Path) -> Inputs:
    """Read and check the files; DataError says what does not fit."""
    model, names = from_bytes(teacher.read_bytes())
    if not isinstance(model, SensorTransformer):
        raise DataError(
            f"{teacher} holds a CNN, which has no blocks to prune; train a transformer "
            "teacher with `edgeloop cloud teacher`"
        )
    x, y, data_names = read_windows_file(data)
    vx, vy, val_names = read_windows_file(validation)
    gx, gy, golden_names = read_windows_file(golden)
    if not names == data_names == val_names == golden_names:
        raise DataError(
            f"class names differ: teacher {names}, data {data_names}, "
            f"validation {val_names}, golden {golden_names}"
        )
    _check_disjoint({"data": x, "validation": vx, "golden": gx})
    if names[0] != "normal":
        raise DataError(
            f"class 0 must be 'normal' (the anomaly scores calibrate on it), got {names[0]!r}"
        )
    return Inputs(model, names, x, y, vx, vy, gx, gy)


def _check_disjoint(sets: dict[str, np.ndarray]) -> None:
    """Refuse sets that share a window: a choice or a report on windows the student
    trained on measures nothing."""
    seen: dict[bytes, str] = {}
    for name, windows in sets.items():
        for w in windows:
            key = np.ascontiguousarray(w).tobytes()
            if key in seen and seen[key] != name:
                raise DataError(
                    f"the {seen[key]} and {name} sets share windows; they must be disjoint "
                    "(split by episode or time, never by overlapping window)"
                )
            seen[key] = name


def budget_misses(
    profile: HardwareProfile, m: ArtifactMetrics, teacher_f1: float | None
) -> list[str]:
    """Each budget ``m`` misses, named as in profiles.toml, with the figures."""
    missed = []
    kb = m.package_bytes / 1024
    if kb > profile.max_package_kb:
        missed.append(f"package {kb:.1f} KB > max_package_kb {profile.max_package_kb}")
    if m.latency_p99_ms > profile.max_latency_ms:
        missed.append(
            f"p99 latency {m.latency_p99_ms:.2f} ms > max_latency_ms {profile.max_latency_ms}"
        )
    if m.peak_rss_mb is not None and m.peak_rss_mb > profile.max_memory_mb:
        missed.append(f"peak memory {m.peak_rss_mb:.0f} MB > max_memory_mb {profile.max_memory_mb}")
    if teacher_f1 is not None:
        drop = 100 * (teacher_f1 - m.macro_f1)
        if drop > profile.max_f1_drop_pts:
            missed.append(
                f"macro-F1 on the validation set {100 * m.macro_f1:.1f} is {drop:.1f} pts "
                f"below the teacher's > max_f1_drop_pts {profile.max_f1_drop_pts}"
            )
    return missed


def compress(
    teacher: SensorTransformer,
    *,
    x: np.ndarray,
    y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    golden_x: np.ndarray,
    golden_y: np.ndarray,
    class_names: list[str],
    profile: HardwareProfile,
    ood: dict[str, Any] | None,
    name: str,
    version: str,
    parent: str | None = None,
    distill_cfg: DistillConfig | None = None,
    latency_windows: int = 300,
    progress: Progress | None = None,
) -> CompressionResult:
    """The smallest student in ``profile.students`` that meets every budget, as the exact
    package a device of that class will run; BudgetError names what no setting could meet.

    ``x, y`` train the student (and calibrate importance); the settings are judged on the
    validation set ``val_x, val_y`` (the macro-F1 budget against the teacher's there); the
    golden set only measures what is reported and never decides anything.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    distill_cfg = distill_cfg or DistillConfig()
    threads = profile.threads
    meta: dict[str, Any] = {"ood": ood} if ood is not None else {}

    def package(model: SensorTransformer, graph: bytes, extra: dict[str, Any]) -> bytes:
        return package_graph(
            graph,
            model,
            name=name,
            version=version,
            parent=parent,
            profile=profile.name,
            class_names=class_names,
            metadata={**meta, **extra},
        )

    def measure(pkg: bytes, memory: bool = False) -> ArtifactMetrics:
        return evaluate_package(
            pkg, golden_x, golden_y, threads=threads, latency_windows=latency_windows, memory=memory
        )

    def validate(pkg: bytes, memory: bool = False) -> ArtifactMetrics:
        return evaluate_package(
            pkg, val_x, val_y, threads=threads, latency_windows=latency_windows, memory=memory
        )

    say(f"teacher: exporting and measuring ({teacher.cfg.backbone}, {teacher.cfg.layers} layers)")
    teacher_pkg = package(teacher, export_onnx(teacher, ood), {})
    teacher_val = validate(teacher_pkg)
    # Golden-set figures (this, and each stage's) are for the report: nothing reads them
    # to decide.
    teacher_metrics = measure(teacher_pkg, memory=True)
    calib = x[np.random.default_rng(0).permutation(len(x))[:512]]
    influence = block_influence(teacher, calib)
    order = sorted(range(len(influence)), key=lambda i: -influence[i])
    say("block influence: " + ", ".join(f"{i}:{b:.4f}" for i, b in enumerate(influence)))

    attempts: list[Attempt] = []
    # A teacher shallower than a setting caps it: the same student is tried once.
    settings = dict.fromkeys((min(n, len(influence)), ffn) for n, ffn in profile.students)
    for layers, ffn_keep in settings:
        keep = sorted(order[:layers])
        shallow = prune_layers(teacher, keep)
        student = prune_ffn(shallow, ffn_importance(shallow, calib), ffn_keep)
        # Size, speed and memory do not depend on training: check them first, cheaply.
        graph = export_onnx(student, ood)
        rows = plan_table(graph, profile.schemes)
        probe = validate(package(student, quantize(graph, rows), {}), memory=True)
        missed = budget_misses(profile, probe, None)
        label = f"layers={layers}, ffn={ffn_keep:.0%}"
        if missed:
            say(f"{label}: skipped before training ({'; '.join(missed)})")
            attempts.append(Attempt(layers, ffn_keep, missed, probe))
            continue
        stages = [Stage("teacher fp32", teacher_metrics)]
        stages.append(
            Stage(f"layers {keep}", measure(package(shallow, export_onnx(shallow, ood), {})))
        )
        stages.append(Stage(f"ffn {ffn_keep:.0%}", measure(package(student, graph, {}))))
        say(f"{label}: distilling for {distill_cfg.epochs} epochs")
        distill(
            student,
            teacher,
            x,
            y,
            distill_cfg,
            on_epoch=lambda e, loss: (
                say(f"  epoch {e + 1}/{distill_cfg.epochs} loss {loss:.4f}")
                if (e + 1) % 10 == 0
                else None
            ),
        )
        graph = export_onnx(student, ood)
        stages.append(Stage("distilled fp32", measure(package(student, graph, {}))))
        rows = plan_table(graph, profile.schemes)
        final = package(
            student,
            quantize(graph, rows),
            {
                "compression": {
                    "teacher_layers": teacher.cfg.layers,
                    "kept_layers": keep,
                    "ffn_keep": ffn_keep,
                    # One entry per weight: a module can hold several (an expert block).
                    "quantization": [[r.module, r.weight, r.scheme] for r in rows],
                }
            },
        )
        # The choice, on the validation set: every budget of the package itself, and its
        # macro-F1 against the teacher's there. The golden set measures it only once chosen.
        edge_val = validate(final, memory=True)
        missed = budget_misses(profile, edge_val, teacher_val.macro_f1)
        attempts.append(Attempt(layers, ffn_keep, missed, edge_val))
        if missed:
            say(f"{label}: misses {'; '.join(missed)}")
            continue
        say(f"{label}: meets every budget of {profile.name} (macro-F1 on validation)")
        edge = measure(final, memory=True)
        stages.append(Stage(f"quantized ({profile.name})", edge))
        return CompressionResult(
            profile=profile,
            package=final,
            teacher=teacher_metrics,
            edge=edge,
            teacher_val=teacher_val,
            edge_val=edge_val,
            stages=stages,
            table=rows,
            block_influence=influence,
            kept_layers=keep,
            removed_layers=sorted(set(range(len(influence))) - set(keep)),
            attempts=attempts,
            student=student,
        )
    detail = "; ".join(
        f"layers={a.layers}, ffn={a.ffn_keep:.0%}: {', '.join(a.missed)}" for a in attempts
    )
    raise BudgetError(f"profile {profile.name!r}: no student setting meets its budgets — {detail}")
