"""Choosing a model on validation (cloud.model.selection), on real TEP windows: the choice
follows the validation set, is deterministic, and refuses sets that are not disjoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TEP_CACHE

FAST = {"epochs": 4}


@pytest.fixture(scope="module")
def tep_val(tep_small):
    """Validation episodes for tep_small's classes: another simulator seed than its training
    (seed 0) and golden episodes."""
    from sim.tep import generate

    train, _ = tep_small
    return generate(
        classes=train.class_names,
        runs_per_class=1,
        seed=7,
        horizon_h=4.0,
        cache_dir=TEP_CACHE,
        workers=2,
    )


def _select(candidates, train, val, val_y=None, seed=0):
    from cloud.model.selection import select_model

    return select_model(
        candidates,
        x=train.x,
        y=train.y,
        val_x=val.x,
        val_y=val.y if val_y is None else val_y,
        class_names=train.class_names,
        seed=seed,
    )


def test_the_choice_follows_the_validation_set(tep_small, tep_val):
    """Relabel validation as candidate A predicts and A is chosen; as B predicts, B is: the
    choice is made on validation (the golden set is no argument, so it cannot move it)."""
    from cloud.model.selection import Candidate
    from cloud.model.train import predict

    train, _ = tep_small
    a = Candidate("cnn", {"hidden": 8, "layers": 1}, FAST)
    b = Candidate("cnn", {"hidden": 48}, FAST)
    pred_a = predict(_select([a], train, tep_val).model, tep_val.x)
    pred_b = predict(_select([b], train, tep_val).model, tep_val.x)
    assert (pred_a != pred_b).any(), "the two candidates must disagree for the test to bite"

    as_a = _select([b, a], train, tep_val, val_y=pred_a)
    as_b = _select([a, b], train, tep_val, val_y=pred_b)

    assert as_a.candidate == a and as_a.best.val_accuracy == 1.0
    assert as_b.candidate == b and as_b.best.val_accuracy == 1.0
    for sel in (as_a, as_b):
        assert sel.best.val_macro_f1 == max(s.val_macro_f1 for s in sel.scores)


def test_a_transformer_candidate_is_chosen_deterministically(tep_small, tep_val):
    """The same seed gives the same scores and the same weights; the table lists every
    candidate in order; a transformer comes back as one, ready to compress."""
    import torch

    from cloud.model.selection import parse_grid
    from cloud.model.transformer import SensorTransformer

    train, _ = tep_small
    grid = parse_grid(["layers=1", "epochs=2"], base={"backbone": "deepseek", "experts": 2})
    grid += parse_grid(["epochs=3", "lr=1e-3,3e-3"], kind="cnn")

    first = _select(grid, train, tep_val, seed=3)
    second = _select(grid, train, tep_val, seed=3)

    assert [s.candidate.name for s in first.scores] == [c.name for c in grid]
    assert [s.val_macro_f1 for s in first.scores] == [s.val_macro_f1 for s in second.scores]
    assert first.candidate == second.candidate
    for p, q in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q)
    transformer = _select(grid[:1], train, tep_val).model
    assert isinstance(transformer, SensorTransformer) and transformer.cfg.layers == 1


def test_sets_that_are_not_disjoint_are_refused(tep_small, tep_val):
    """Validation that repeats training windows, or lacks a class, is a DataError."""
    from cloud.model.selection import Candidate
    from shared.errors import DataError

    train, _ = tep_small
    c = [Candidate("cnn", {}, {"epochs": 1})]
    leaky = train.subset(np.arange(len(train)) % 5 == 0)
    no_fault = tep_val.subset(tep_val.y == 0)

    with pytest.raises(DataError, match="also training windows"):
        _select(c, train, leaky)
    with pytest.raises(DataError, match="no windows of"):
        _select(c, train, no_fault)


def test_grid_parsing():
    """KEY=V1,V2 entries multiply out in order; unknown keys and bad values name the fix."""
    from cloud.model.selection import parse_grid

    grid = parse_grid(["layers=1,2", "lr=1e-3,3e-3"], base={"backbone": "patchtst"})

    assert [(c.arch["layers"], c.train["lr"]) for c in grid] == [
        (1, 1e-3),
        (1, 3e-3),
        (2, 1e-3),
        (2, 3e-3),
    ]
    assert all(c.arch["backbone"] == "patchtst" for c in grid)
    with pytest.raises(ValueError, match="unknown setting 'depth'"):
        parse_grid(["depth=3"])
    with pytest.raises(ValueError, match="not a int"):
        parse_grid(["layers=two"])
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_grid(["layers"])


def test_teacher_command_writes_the_chosen_model_and_its_table(tep_small, tep_val, tmp_path):
    """`edgeloop cloud teacher` keeps the validation winner and writes every score beside
    it; a validation file that repeats training windows exits 2."""
    from typer.testing import CliRunner

    from cloud.cli import app  # the `edgeloop cloud` commands
    from cloud.model.checkpoint import from_bytes

    train, _ = tep_small
    files = {}
    for name, d in (("train", train), ("val", tep_val)):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], x=d.x, y=d.y, class_names=np.array(d.class_names))
    out = tmp_path / "teacher.safetensors"
    args = ["teacher", "--data", str(files["train"]), "--backbone", "deepseek"]
    grid = ["--grid", "layers=1,2", "--grid", "epochs=2"]

    ok = CliRunner().invoke(
        app, [*args, "--validation", str(files["val"]), *grid, "--out", str(out)]
    )
    leak = CliRunner().invoke(app, [*args, "--validation", str(files["train"]), *grid])

    assert ok.exit_code == 0, ok.output
    table = json.loads((tmp_path / "teacher.safetensors.selection.json").read_text())
    assert [c["arch"]["layers"] for c in table["candidates"]] == [1, 2]
    best = max(table["candidates"], key=lambda c: (c["val_macro_f1"], -c["params"]))
    model, names = from_bytes(out.read_bytes())
    assert names == train.class_names and model.cfg.layers == best["arch"]["layers"]
    assert table["chosen"] == best["candidate"]
    assert leak.exit_code == 2 and "also training windows" in leak.output
