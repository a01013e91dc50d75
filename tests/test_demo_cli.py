"""The walking skeleton end to end (`edgeloop demo`), the CLI's help, and bad input."""

from __future__ import annotations

import subprocess
import sys

from mlflow import MlflowClient

from sim.demo import format_table, run_demo

from .conftest import ROOT, TEP_CACHE

EDGELOOP = [sys.executable, "-c", "from shared.cli import main; main()"]


def test_demo_loop_learns_the_new_fault(tmp_path):
    """Two agents on two plants: the new fault is unknown before the round and recognised
    after the update, the old classes stay recognised, and MLflow holds both versions."""
    home = tmp_path / "demo"
    (home / "cache").parent.mkdir(parents=True)
    TEP_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(TEP_CACHE, target_is_directory=True)
    lines: list[str] = []
    rows = run_demo(
        home=home, devices=2, rounds=1, new_faults=["idv_06"], horizon_h=4.0, echo=lines.append
    )
    (row,) = rows
    assert row.promoted and row.version_before == "v1" and row.version_after == "v2"
    assert row.new_acc_before == 0.0  # v1 has no such class
    assert row.new_acc_after >= 0.9
    assert row.old_acc_after >= 0.9
    assert row.uploaded > 0 and row.labelled == row.uploaded
    # The devices received the delta from v1 (read back from their reports), not v2 whole.
    assert 0 < row.update_bytes < row.package_bytes
    assert format_table(rows) in "\n".join(lines)
    assert (home / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'edgeloop.demo.cpu-fp32'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    for d in ("plant-01", "plant-02"):
        assert (home / "edge" / d / "models" / "current").read_text() in ("a", "b")
    from cloud.rollout.fleet import fleet_status
    from cloud.store.db import session_factory

    with session_factory(f"sqlite:///{home / 'edgeloop.db'}")() as session:
        status = fleet_status(session=session, fleet="demo")
    # Every upload acked (nothing left on a device), every agent said goodbye, on v2.
    assert [(r.model_version, r.online, r.buffer_depth) for r in status] == [("v2", False, 0)] * 2
    assert sum(r.samples for r in status) >= row.uploaded


def test_help_explains_itself():
    """`edgeloop --help` and `edgeloop demo --help` describe what they do."""
    top = subprocess.run([*EDGELOOP, "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for word in ("demo", "edge", "cloud", "continuous learning"):
        assert word in top.stdout
    demo = subprocess.run([*EDGELOOP, "demo", "--help"], capture_output=True, text=True)
    assert demo.returncode == 0
    assert "before and after" in demo.stdout and "--devices" in demo.stdout
    for sub in (["edge", "run"], ["cloud", "ingest"], ["data", "generate"]):
        out = subprocess.run([*EDGELOOP, *sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "Usage" in out.stdout


def test_demo_rejects_unknown_fault(tmp_path):
    """An unknown fault name stops the demo at once with a clear error and exit code 2."""
    out = subprocess.run(
        [*EDGELOOP, "demo", "--home", str(tmp_path), "--new", "idv_99"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unknown fault 'idv_99'" in out.stderr
