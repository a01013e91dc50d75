"""The import-linter contracts in pyproject.toml: kept by the tree, broken by a forbidden
import (so CI's `lint-imports` really guards the layers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def tree(tmp_path):
    """A copy of the four packages and the contracts, to break."""
    for name in ("cloud", "shared", "edge_agent", "sim"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract():
    """lint-imports passes on the project as it is."""
    out = lint(ROOT)

    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("cloud/rollout/controller.py", "from cloud.learn.state import STAGES", "cloud.learn"),
        ("cloud/model/evaluation.py", "import torch", "torch"),
        ("cloud/ingest/ingestor.py", "from cloud.model import metrics", "cloud.model"),
        ("cloud/store/db.py", "from cloud.learn import rounds", "cloud.learn"),
        ("edge_agent/agent.py", "import sqlalchemy", "sqlalchemy"),
        ("shared/topics.py", "import cloud.config", "cloud"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tree, module, line, broken):
    """One import against the layering is enough for lint-imports to fail, naming it."""
    with open(tree / module, "a") as fh:
        fh.write(f"\n{line}  # noqa\n")

    out = lint(tree)

    assert out.returncode == 1, out.stdout
    assert f"is not allowed to import {broken}" in out.stdout
