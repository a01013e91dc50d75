"""`edgeloop cloud register-dataset`: the data sets a fleet's rounds read by name (its
base history, the validation set its choices are made on, the frozen golden set)."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.errors import EdgeloopError

# The names rounds read by default (cloud.learn.state.RoundConfig), in the order a choice
# and a report depend on: none of them may share a window with another.
ROLES = ("base", "validation", "golden")


def register_dataset_cmd(
    name: str = typer.Argument(
        ..., help="The name rounds read it by: base, validation or golden (or your own)."
    ),
    file: Path = typer.Argument(
        ...,
        exists=True,
        dir_okay=False,
        help="An .npz of windows: x (N, T, C) float32, y (N,) class indices, class_names "
        "(what `edgeloop data generate` writes).",
    ),
) -> None:
    """Register (or replace) a data set in the object store. Refused when it shares a window
    with another registered set of base, validation and golden: training, the choices and
    the reports must see disjoint windows (split by episode or time, never by window)."""
    import numpy as np

    from cloud.config import get_settings
    from cloud.store.datasets import LabelledWindows, load_dataset, read_windows_file
    from cloud.store.datasets import register_dataset as register
    from cloud.store.objects import ObjectNotFound, open_store
    from shared.errors import DataError

    try:
        x, y, names = read_windows_file(file)
        data = LabelledWindows(x, np.array(names)[y])
        store = open_store(get_settings())
        mine = {np.ascontiguousarray(w).tobytes() for w in x}
        for other in ROLES:
            if other == name:
                continue
            try:
                theirs = load_dataset(store=store, name=other)
            except ObjectNotFound:
                continue
            shared = sum(np.ascontiguousarray(w).tobytes() in mine for w in theirs.x)
            if shared:
                raise DataError(
                    f"{file} shares {shared} window(s) with the registered {other!r} set; "
                    "register windows of other episodes (or times) instead"
                )
        digest = register(store=store, name=name, data=data)
    except EdgeloopError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    classes = ", ".join(f"{c} {int((data.labels == c).sum())}" for c in names)
    typer.echo(f"registered {name!r}: {len(data)} windows ({classes}), sha256 {digest[:12]}")
