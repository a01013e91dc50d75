"""`edgeloop cloud teacher` and `edgeloop compress`: a teacher from windows, and its package
for one class of device."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.errors import EdgeloopError


def teacher(
    data: Path = typer.Option(..., help="Training windows (.npz from `edgeloop data generate`)."),
    out: Path = typer.Option(Path("teacher.safetensors"), help="Checkpoint to write."),
    backbone: str = typer.Option("patchtst", help="patchtst, or deepseek (MLA + MoE)."),
    layers: int = typer.Option(6, min=1),
    d_model: int = typer.Option(64, min=8),
    heads: int = typer.Option(4, min=1),
    ffn: int = typer.Option(128, min=8),
    epochs: int = typer.Option(40, min=1),
) -> None:
    """Train a transformer teacher on labelled windows; writes spec + weights (safetensors)."""
    import numpy as np
    from tqdm import tqdm

    from cloud.model.backbones import BACKBONES
    from cloud.model.checkpoint import to_bytes
    from cloud.model.configs import TrainConfig
    from cloud.model.train import train
    from cloud.model.transformer import ModelSpec, build
    from cloud.store.datasets import read_windows_file

    if backbone not in BACKBONES:
        raise typer.BadParameter(f"choose one of {tuple(BACKBONES)}", param_hint="--backbone")
    try:
        x, y, names = read_windows_file(data)
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    spec = ModelSpec(
        backbone=backbone,
        window=x.shape[1],
        channels=x.shape[2],
        n_classes=len(names),
        layers=layers,
        d_model=d_model,
        heads=heads,
        ffn=ffn,
    )
    model = build(spec, x[y == 0])
    with tqdm(total=epochs, desc=f"{backbone} teacher", unit="epoch") as bar:

        def on_epoch(_e: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()

        train(model, x, y, TrainConfig(epochs=epochs, lr=2e-3), on_epoch=on_epoch)
    out.write_bytes(to_bytes(model.eval(), names))
    params = sum(int(np.prod(p.shape)) for p in model.parameters())
    typer.echo(f"wrote {out}: {backbone}, {layers} layers, {params} parameters, {names}")


def compress(
    profile: str = typer.Option(..., help="Hardware profile, e.g. rpi4-int8, jetson-fp16."),
    teacher: Path = typer.Option(..., help="Teacher checkpoint (`edgeloop cloud teacher`)."),
    data: Path = typer.Option(..., help="Windows the student learns from (.npz)."),
    golden: Path = typer.Option(..., help="Frozen golden windows that measure (.npz)."),
    out: Path = typer.Option(Path("compressed"), help="Folder for the package and report."),
    version: str = typer.Option("v1", help="Version written into the package manifest."),
    fleet: str = typer.Option("default", help="Fleet, for the package's name."),
    epochs: int = typer.Option(40, min=1, help="Distillation epochs per student setting."),
    profiles_file: Path = typer.Option(None, help="Profiles TOML (default: the shipped one)."),
) -> None:
    """Compress a teacher for one class of device: prune (block influence, FFN channels),
    distil, quantize per layer, and measure **the exact package** a device will load.

    Writes `<profile>.edgepkg`, `report.json`, `report.md` (stages and the layer-by-layer
    quantization table) and `stages.png`. Exits 2, naming the budget, when no student
    setting of the profile meets its budgets.
    """
    from cloud.compress.distill import DistillConfig
    from cloud.compress.pipeline import compress as run_compress
    from cloud.compress.pipeline import read_inputs
    from cloud.compress.profiles import get_profile
    from cloud.compress.report import summary_text, write_report
    from cloud.model.ood import ood_calibration
    from shared.package import model_name

    try:
        hw = get_profile(profile, profiles_file)
        inputs = read_inputs(teacher=teacher, data=data, golden=golden)
        x, y = inputs.x, inputs.y
        result = run_compress(
            inputs.teacher,
            x=x,
            y=y,
            golden_x=inputs.golden_x,
            golden_y=inputs.golden_y,
            class_names=inputs.class_names,
            profile=hw,
            ood=ood_calibration(x[y == 0]),
            name=model_name(fleet, hw.name),
            version=version,
            distill_cfg=DistillConfig(epochs=epochs),
            progress=lambda msg: typer.echo(f"[{hw.name}] {msg}", err=True),
        )
    except (EdgeloopError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except (ValueError, KeyError, RuntimeError) as exc:  # e.g. a file that is no checkpoint
        typer.secho(
            f"error: cannot use {teacher} with {data}: {exc!r}; pass a checkpoint from "
            "`edgeloop cloud teacher` and windows of the same shape",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from exc
    typer.echo(summary_text(result, write_report(result, out)))
