"""`edgeloop cloud teacher` and `edgeloop compress`: a teacher from windows, and its package
for one class of device."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.errors import DataError, EdgeloopError


def teacher(
    data: Path = typer.Option(..., help="Training windows (.npz from `edgeloop data generate`)."),
    validation: Path = typer.Option(
        ...,
        help="Validation windows (.npz) from other episodes than --data (another --seed): "
        "the candidates are judged on them. Never pass the golden set here.",
    ),
    out: Path = typer.Option(Path("teacher.safetensors"), help="Checkpoint to write."),
    backbone: str = typer.Option("patchtst", help="patchtst, or deepseek (MLA + MoE)."),
    grid: list[str] | None = typer.Option(
        None,
        "--grid",
        help="Candidates as KEY=V1,V2 (repeat for more keys; every combination is tried): "
        "an architecture field (layers, d_model, heads, ffn, patch, dropout, experts, moe_ffn, "
        "...) or a training setting (epochs, lr, batch_size, weight_decay). Example: "
        "--grid layers=1,2,4 --grid lr=1e-3,3e-3. Default: layers=1,2,4,6.",
    ),
    layers: int = typer.Option(6, min=1, help="Blocks, where --grid does not vary them."),
    d_model: int = typer.Option(64, min=8, help="Width, where --grid does not vary it."),
    heads: int = typer.Option(4, min=1, help="Attention heads, where --grid does not vary them."),
    ffn: int = typer.Option(128, min=8, help="FFN width, where --grid does not vary it."),
    epochs: int = typer.Option(40, min=1, help="Training epochs, where --grid does not vary them."),
    lr: float = typer.Option(2e-3, help="Peak learning rate, where --grid does not vary it."),
    seed: int = typer.Option(0, help="Initial weights and batch order of every candidate."),
) -> None:
    """Train a transformer teacher: every --grid candidate is trained on --data and the one
    with the best macro-F1 on --validation is kept (ties: the smaller model). The default
    grid tries 1, 2, 4 and 6 blocks, so a task that needs no depth gets no padding.

    Writes the checkpoint (spec + weights, safetensors) and, beside it,
    `<out>.selection.json` with every candidate's validation score.
    """
    import json

    from cloud.model.backbones import BACKBONES
    from cloud.model.checkpoint import to_bytes
    from cloud.model.configs import TrainConfig
    from cloud.model.selection import DEFAULT_GRID, parse_grid, select_model
    from cloud.store.datasets import read_windows_file

    if backbone not in BACKBONES:
        raise typer.BadParameter(f"choose one of {tuple(BACKBONES)}", param_hint="--backbone")
    base = {"backbone": backbone, "layers": layers, "d_model": d_model, "heads": heads}
    try:
        candidates = parse_grid(grid or DEFAULT_GRID, base={**base, "ffn": ffn})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--grid") from exc
    try:
        x, y, names = read_windows_file(data)
        vx, vy, val_names = read_windows_file(validation)
        if val_names != names:
            raise DataError(f"class names differ: data {names}, validation {val_names}")
        chosen = select_model(
            candidates,
            x=x,
            y=y,
            val_x=vx,
            val_y=vy,
            class_names=names,
            seed=seed,
            base=TrainConfig(epochs=epochs, lr=lr),
            progress=lambda msg: typer.echo(f"[teacher] {msg}", err=True),
        )
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:  # a candidate that cannot be built, e.g. d_model % heads
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    out.write_bytes(to_bytes(chosen.model, names))
    table = out.with_name(out.name + ".selection.json")
    table.write_text(json.dumps({"chosen": chosen.candidate.name, "candidates": chosen.table()}))
    typer.echo(chosen.format_table())
    typer.echo(
        f"wrote {out}: {chosen.candidate.name}, {chosen.best.params} parameters, "
        f"validation macro-F1 {100 * chosen.best.val_macro_f1:.2f}; every candidate in {table}"
    )


def compress(
    profile: str = typer.Option(..., help="Hardware profile, e.g. rpi4-int8, jetson-fp16."),
    teacher: Path = typer.Option(..., help="Teacher checkpoint (`edgeloop cloud teacher`)."),
    data: Path = typer.Option(..., help="Windows the student learns from (.npz)."),
    validation: Path = typer.Option(
        ...,
        help="Validation windows (.npz, episodes disjoint from --data and --golden): the "
        "student setting is chosen on them.",
    ),
    golden: Path = typer.Option(..., help="Frozen golden windows that only measure (.npz)."),
    out: Path = typer.Option(Path("compressed"), help="Folder for the package and report."),
    version: str = typer.Option("v1", help="Version written into the package manifest."),
    fleet: str = typer.Option("default", help="Fleet, for the package's name."),
    epochs: int = typer.Option(40, min=1, help="Distillation epochs per student setting."),
    profiles_file: Path = typer.Option(None, help="Profiles TOML (default: the shipped one)."),
) -> None:
    """Compress a teacher for one class of device: prune (block influence, FFN channels),
    distil, quantize per layer, and measure **the exact package** a device will load. The
    first student setting of the profile that meets every budget on --validation ships;
    --golden only measures it.

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
        inputs = read_inputs(teacher=teacher, data=data, validation=validation, golden=golden)
        x, y = inputs.x, inputs.y
        result = run_compress(
            inputs.teacher,
            x=x,
            y=y,
            val_x=inputs.val_x,
            val_y=inputs.val_y,
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
