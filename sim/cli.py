"""Commands that need the simulated plants: `edgeloop demo` and `edgeloop data`."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.errors import EdgeloopError

data_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Generate labelled TEP windows (tep-studio) for training and tests.",
    no_args_is_help=True,
)


def demo(
    home: Path = typer.Option(
        Path(".edgeloop/demo"),
        help="Where the demo keeps its state "
        "(SQLite, objects, MLflow store, device slots); wiped each run "
        "except the simulation cache.",
    ),
    devices: int = typer.Option(3, min=1, max=20, help="Simulated plants, one edge agent each."),
    rounds: int | None = typer.Option(
        None,
        min=1,
        help="Rounds of the loop; each brings the next new fault. Default: one per new fault.",
    ),
    initial: str = typer.Option(
        "normal,idv_01,idv_02,idv_07",
        help="Faults the first model is trained on (comma-separated).",
    ),
    new: str = typer.Option(
        "idv_06,idv_14", help="Faults that appear later, one per round (comma-separated)."
    ),
    seed: int = typer.Option(0, help="Seed of the plants and the training."),
    workers: int = typer.Option(2, min=1, help="Processes for simulating the plants."),
) -> None:
    """Run the whole loop on this machine with embedded defaults and print, per round, the
    fleet's accuracy on the new fault before and after the update.

    Nothing to start first: SQLite, an in-process MQTT broker, a local object store and an
    MLflow sqlite store. Takes a few minutes on two cores; the plant simulations are cached
    under HOME/cache, so a second run is faster.
    """
    from sim.demo import run_demo

    try:
        run_demo(
            home=home,
            devices=devices,
            rounds=rounds,
            initial_faults=[f.strip() for f in initial.split(",") if f.strip()],
            new_faults=[f.strip() for f in new.split(",") if f.strip()],
            seed=seed,
            workers=workers,
            echo=typer.echo,
        )
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


@data_app.command("generate")
def generate_cmd(
    out: Path = typer.Argument(..., help="Output .npz file (x, y, class_names)."),
    classes: str = typer.Option(
        "normal,idv_01,idv_02,idv_07", help="Classes: 'normal' and/or idv_01..idv_28."
    ),
    runs_per_class: int = typer.Option(2, help="Simulated episodes per class."),
    seed: int = typer.Option(0),
    horizon_h: float = typer.Option(5.0, help="Hours simulated per episode."),
    cache_dir: Path = typer.Option(Path(".edgeloop/cache"), help="Simulation cache."),
    workers: int = typer.Option(2, min=1),
    golden: bool = typer.Option(
        False, "--golden", help="The frozen golden set's seeds (disjoint from training seeds)."
    ),
) -> None:
    """Simulate episodes and write labelled windows (41 measurements + 12 MVs per step)."""
    import numpy as np

    from sim.tep import GOLDEN_SEED, generate

    try:
        data = generate(
            classes=[c.strip() for c in classes.split(",")],
            runs_per_class=runs_per_class,
            seed=GOLDEN_SEED if golden else seed,
            horizon_h=horizon_h,
            cache_dir=cache_dir,
            workers=workers,
        )
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    np.savez(out, x=data.x, y=data.y, class_names=np.array(data.class_names))
    counts = np.bincount(data.y, minlength=len(data.class_names))
    typer.echo(
        f"wrote {len(data)} windows {data.x.shape[1:]} to {out}: "
        + ", ".join(f"{c}={n}" for c, n in zip(data.class_names, counts, strict=True))
    )
