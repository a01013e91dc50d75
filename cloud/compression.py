"""Teacher → edge package for one hardware profile: prune, distil, quantize, evaluate.

The stages, each measured on the golden set as an ONNX package under ONNX Runtime:

1. **Layer pruning** by block influence (ShortGPT): a block whose output is nearly its
   input (cosine similarity close to 1) changes little and goes first.
2. **FFN-channel pruning**: each FFN keeps its channels with the largest
   |activation| × ‖outgoing weights‖ (Wanda-style), experts each their own.
3. **Distillation** (recovery): the pruned student, initialised from the teacher's own
   layers, learns the teacher's temperature-softened logits plus the hard labels.
4. **Per-layer quantization** of the exported graph (cloud.quantization).

The artifact evaluated is the package a device loads, byte for byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.evaluation import ArtifactMetrics, evaluate_package, make_package
from cloud.models import SensorTransformer
from cloud.profiles import HardwareProfile
from cloud.pruning import block_influence, ffn_importance, prune_ffn, prune_layers
from cloud.quantization import QuantRow, plan_table, quantize
from cloud.training import balanced_weights, export_onnx, one_cycle
from shared.errors import BudgetError
from shared.package import sha256_hex

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


# -- distillation ----------------------------------------------------------------------------


@dataclass
class DistillConfig:
    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 − alpha on the hard labels
    weight_decay: float = 1e-4
    seed: int = 0


@torch.no_grad()
def logits_of(model: nn.Module, x: np.ndarray, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(torch.as_tensor(x[i : i + batch])) for i in range(0, len(x), batch)])


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: DistillConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Temperature-scaled KL to the teacher's logits (× T², Hinton et al.) plus
    class-balanced cross-entropy on the labels; AdamW with a one-cycle schedule.

    A label of -1 marks a window nobody labelled: it still teaches through the teacher's
    logits, which is how a fleet's unlabelled uploads help the student."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    soft = logits_of(teacher, x)  # the teacher is fixed: its logits are computed once
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    weights = balanced_weights(yt, soft.shape[1])
    opt, sched = one_cycle(student, len(xt), cfg)
    t = cfg.temperature
    student.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = student(xt[idx])
            kd = F.kl_div(
                F.log_softmax(out / t, dim=1),
                F.softmax(soft[idx] / t, dim=1),
                reduction="batchmean",
            )
            labelled = yt[idx] >= 0  # windows without a label learn from the teacher only
            ce = (
                F.cross_entropy(out[labelled], yt[idx][labelled], weight=weights)
                if labelled.any()
                else out.sum() * 0.0
            )
            loss = cfg.alpha * t * t * kd + (1 - cfg.alpha) * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
    return student.eval()


# -- the pipeline ----------------------------------------------------------------------------


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
    teacher: ArtifactMetrics
    edge: ArtifactMetrics
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
            "edge_peak_rss_mb": e.peak_rss_mb,
            "kept_layers": self.kept_layers,
            "removed_layers": self.removed_layers,
            "block_influence": [round(b, 5) for b in self.block_influence],
            "stages": {s.name: s.metrics.summary() for s in self.stages},
            "edge_recall": e.recall,
        }


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
                f"macro-F1 {100 * m.macro_f1:.1f} is {drop:.1f} pts below the teacher's "
                f"> max_f1_drop_pts {profile.max_f1_drop_pts}"
            )
    return missed


def compress(
    teacher: SensorTransformer,
    *,
    x: np.ndarray,
    y: np.ndarray,
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

    ``x, y`` train the student (and calibrate importance); the golden set only measures.
    """
    say = progress or (lambda msg: log.info("%s", msg))
    distill_cfg = distill_cfg or DistillConfig()
    threads = profile.threads
    meta: dict[str, Any] = {"ood": ood} if ood is not None else {}

    def package(model: nn.Module, graph: bytes, extra: dict[str, Any]) -> bytes:
        return make_package(
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

    say(f"teacher: exporting and measuring ({teacher.cfg.backbone}, {teacher.cfg.layers} layers)")
    teacher_metrics = measure(package(teacher, export_onnx(teacher, ood), {}), memory=True)
    calib = x[np.random.default_rng(0).permutation(len(x))[:512]]
    influence = block_influence(teacher, calib)
    order = sorted(range(len(influence)), key=lambda i: -influence[i])
    say("block influence: " + ", ".join(f"{i}:{b:.4f}" for i, b in enumerate(influence)))

    attempts: list[Attempt] = []
    for layers, ffn_keep in profile.students:
        layers = min(layers, len(influence))
        keep = sorted(order[:layers])
        shallow = prune_layers(teacher, keep)
        student = prune_ffn(shallow, ffn_importance(shallow, calib), ffn_keep)
        # Size, speed and memory do not depend on training: check them first, cheaply.
        graph = export_onnx(student, ood)
        rows = plan_table(graph, profile.schemes)
        probe = measure(package(student, quantize(graph, rows), {}), memory=True)
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
        edge = measure(final, memory=True)
        stages.append(Stage(f"quantized ({profile.name})", edge))
        missed = budget_misses(profile, edge, teacher_metrics.macro_f1)
        attempts.append(Attempt(layers, ffn_keep, missed, edge))
        if missed:
            say(f"{label}: misses {'; '.join(missed)}")
            continue
        say(f"{label}: meets every budget of {profile.name}")
        return CompressionResult(
            profile=profile,
            package=final,
            teacher=teacher_metrics,
            edge=edge,
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


# -- report ----------------------------------------------------------------------------------


def format_stages(result: CompressionResult) -> str:
    head = (
        "| stage | package KB | p50 ms | p99 ms | accuracy | macro-F1 |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {s.name} | {s.metrics.package_bytes / 1024:.1f} | {s.metrics.latency_p50_ms:.3f} "
        f"| {s.metrics.latency_p99_ms:.3f} | {100 * s.metrics.accuracy:.1f} "
        f"| {100 * s.metrics.macro_f1:.1f} |"
        for s in result.stages
    ]
    return "\n".join([head, *lines])


def stages_figure(result: CompressionResult):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in result.stages]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [
        ([s.metrics.package_bytes / 1024 for s in result.stages], "package (KB)"),
        (
            [s.metrics.latency_p50_ms for s in result.stages],
            f"p50 latency, {result.profile.threads} thread(s) (ms)",
        ),
        ([100 * s.metrics.macro_f1 for s in result.stages], "golden macro-F1 (%)"),
    ]
    for ax, (values, title) in zip(axes, series, strict=True):
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[2].set_ylim(min(50.0, *series[2][0]) - 1, 100.5)
    fig.suptitle(f"{result.profile.name}: teacher → edge package, stage by stage")
    fig.tight_layout()
    return fig


def write_report(result: CompressionResult, out: Path) -> dict[str, Path]:
    """package, report.json, report.md (stages + quantization table) and stages.png."""
    from cloud.quantization import format_table

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "package": out / f"{result.profile.name}.edgepkg",
        "json": out / "report.json",
        "markdown": out / "report.md",
        "plot": out / "stages.png",
    }
    paths["package"].write_bytes(result.package)
    body = {**result.summary(), "quantization": [r.as_dict() for r in result.table]}
    body["attempts"] = [
        {"layers": a.layers, "ffn_keep": a.ffn_keep, "missed": a.missed} for a in result.attempts
    ]
    paths["json"].write_text(json.dumps(body, indent=2))
    paths["markdown"].write_text(
        f"# Compression report: {result.profile.name}\n\n"
        f"package sha256 `{result.sha256}`; kept layers {result.kept_layers} of "
        f"{len(result.block_influence)} (block influence "
        f"{[round(b, 4) for b in result.block_influence]})\n\n"
        f"## Stages (golden set, ONNX Runtime, {result.profile.threads} thread(s))\n\n"
        f"{format_stages(result)}\n\n"
        f"## Quantization, layer by layer\n\n{format_table(result.table)}\n"
    )
    fig = stages_figure(result)
    fig.savefig(paths["plot"], dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
