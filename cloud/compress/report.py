"""What `edgeloop compress` leaves beside the package: the stage table, the plot, and
report.json / report.md with the layer-by-layer quantization table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.compress.pipeline import CompressionResult
from cloud.compress.quantization import format_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def stages_figure(result: CompressionResult) -> Figure:
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


def summary_text(result: CompressionResult, paths: dict[str, Path]) -> str:
    """What `edgeloop compress` prints: the stages, the quantization table, the verdict."""
    s = result.summary()
    return (
        f"{format_stages(result)}\n\n{format_table(result.table)}\n\n"
        f"{paths['package']}: {s['edge_bytes'] / 1024:.1f} KB "
        f"({s['size_ratio']:.1f}x smaller than the teacher), p50 {s['edge_latency_ms']:.3f} ms "
        f"({s['speedup']:.1f}x faster), macro-F1 {100 * s['edge_macro_f1']:.1f} "
        f"(teacher {100 * s['teacher_macro_f1']:.1f}); sha256 {result.sha256[:16]}…\n"
        f"report: {paths['markdown']}, plot: {paths['plot']}"
    )


def write_report(result: CompressionResult, out: Path) -> dict[str, Path]:
    """package, report.json, report.md (stages + quantization table) and stages.png."""
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
