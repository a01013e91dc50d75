"""The chaos suite's own world: a private PostgreSQL, Redis, Mosquitto and SeaweedFS S3
on spare loopback ports (started once per session, by scripts/services except Redis, which
runs with AOF as in production; stopping them never disturbs the services the rest of the
tests share), the seeded fault schedule, and the table each run prints and writes under
.edgeloop/."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import HOST, ROOT

SERVICES = ROOT / "scripts" / "services"
# The fault points come from this seed: a failing run is replayed exactly with the same
# EDGELOOP_CHAOS_SEED (the table names the seed it ran with).
SEED = int(os.environ.get("EDGELOOP_CHAOS_SEED", "15"))
GRPC_OFFSET = 10000  # SeaweedFS also listens on each of its ports + 10000


def spare_ports(n: int, *, grpc: bool = False) -> list[int]:
    """``n`` free loopback ports (with their +10000 twins free too, for SeaweedFS)."""
    held, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind((HOST, 0))
        held.append(s)
        port = s.getsockname()[1]
        if grpc:
            if port + GRPC_OFFSET > 65535:
                continue
            twin = socket.socket()
            try:
                twin.bind((HOST, port + GRPC_OFFSET))
            except OSError:
                continue
            finally:
                twin.close()
        ports.append(port)
    for s in held:
        s.close()
    return ports


class PrivateServices:
    """scripts/services run with its ports and state moved: up, stop, restart one."""

    def __init__(self, workdir: Path) -> None:
        pg, redis, mqtt = spare_ports(3)
        s3, master, volume, filer = spare_ports(4, grpc=True)
        self.ports = {"postgres": pg, "redis": redis, "mosquitto": mqtt, "seaweedfs": s3}
        self.dir = workdir
        self.env = {
            **os.environ,
            "EDGELOOP_SERVICES_DIR": str(workdir),
            "EDGELOOP_POSTGRES_PORT": str(pg),
            "EDGELOOP_REDIS_PORT": str(redis),
            "EDGELOOP_MOSQUITTO_PORT": str(mqtt),
            "EDGELOOP_SEAWEEDFS_PORT": str(s3),
            "EDGELOOP_SEAWEEDFS_MASTER_PORT": str(master),
            "EDGELOOP_SEAWEEDFS_VOLUME_PORT": str(volume),
            "EDGELOOP_SEAWEEDFS_FILER_PORT": str(filer),
        }

    def _script(self, verb: str, *names: str) -> None:
        out = subprocess.run([sys.executable, str(SERVICES), verb, *names], env=self.env,
                             capture_output=True, text=True, timeout=180)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"scripts/services {verb} {' '.join(names)} failed:\n"
                               f"{out.stdout[-3000:]}{out.stderr[-2000:]}")  # fmt: skip

    def up(self, *names: str) -> None:
        if "redis" in names:
            self._redis_up()
        if rest := [n for n in names if n != "redis"]:
            self._script("up", *rest)

    def _redis_up(self) -> None:
        """Redis as production runs it (docker-compose.yml: --appendonly yes), which
        scripts/services does not: a restart keeps the Celery queue and its unacked tasks
        (fsync on every write, so that a restart loses nothing a client was told)."""
        data = self.dir / "redis"
        data.mkdir(exist_ok=True)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", HOST, "--port",
                        str(self.ports["redis"]), "--appendonly", "yes", "--appendfsync",
                        "always", "--save", "", "--dir", str(data), "--pidfile",
                        str(data / "redis.pid"), "--logfile", str(data / "redis.log")],
                       check=True, capture_output=True)  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.answers("redis"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start; see {data / 'redis.log'}")
            time.sleep(0.1)

    def down(self) -> None:
        """Stop everything; SeaweedFS is SIGKILLed (its data is thrown away with the run,
        and its SIGTERM takes 25 s)."""
        if self.answers("redis"):
            self._redis_stop()
        if self.answers("seaweedfs"):
            self.stop("seaweedfs")
        self._script("down", *(n for n in self.ports if n != "redis"))
        # As root, scripts/services keeps the cluster under the postgres user's home, one
        # folder per state directory (its postgres_home()): this run's goes with it.
        tag = hashlib.sha256(str(self.dir).encode()).hexdigest()[:10]
        with contextlib.suppress(KeyError):
            home = Path(pwd.getpwnam("postgres").pw_dir) / f"edgeloop-{tag}"
            if os.geteuid() == 0 and home.is_dir():
                shutil.rmtree(home, ignore_errors=True)

    def _redis_stop(self) -> None:
        pid = int((self.dir / "redis" / "redis.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)

    def answers(self, name: str) -> bool:
        try:
            with socket.create_connection((HOST, self.ports[name]), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, name: str) -> None:
        """Stop one service as a crash or an operator would: SeaweedFS is SIGKILLed (its
        SIGTERM takes 25 s), Redis SIGTERMed, the others stopped by scripts/services
        (PostgreSQL `-m fast`: every open connection cut)."""
        if name == "seaweedfs":
            state = json.loads((self.dir / "state.json").read_text())
            os.killpg(state["seaweedfs"]["pid"], signal.SIGKILL)
        elif name == "redis":
            self._redis_stop()
        else:
            self._script("down", name)
        deadline = time.monotonic() + 30
        while self.answers(name) and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self, name: str, pause_s: float) -> float:
        """Stop ``name``, leave it down ``pause_s``, start it on the same port and data;
        the seconds it was unreachable."""
        t0 = time.monotonic()
        self.stop(name)
        time.sleep(pause_s)
        self.up(name)
        return time.monotonic() - t0


@dataclass(frozen=True)
class Plan:
    """The seeded fault points of one run (CI: each fault once; --chaos-full: more of
    everything, for longer)."""

    seed: int
    full: bool
    devices: int  # uploading agents in this process (one more in a process of its own,
    # one more taking updates through a link that is cut)
    restarts: list[tuple[str, int, float]]  # (service, after N more stored, seconds down)
    ingest_kills: list[tuple[int, float, float]]  # (after N more stored, delay, seconds down)
    agent_kills: list[tuple[int, float, float]]  # the same, for the agent in a process
    worker_kill_delay_s: float  # after the round's training reports progress
    redis_restart_delay_s: float  # after the second worker takes the round
    beat_kill_delay_s: float  # after the rollout starts
    cut_fraction: float  # of the package's chunks on the cut device's disk before the cut
    cut_s: float  # seconds the device stays cut off
    # During the v2 rollout (delay, seconds down): Mosquitto once the first update chunk
    # is on a device's disk, PostgreSQL while the cut device is off its link.
    rollout_mqtt: tuple[float, float]
    rollout_pg: tuple[float, float]

    @classmethod
    def make(cls, seed: int, full: bool) -> Plan:
        rng = random.Random(seed)
        services = ["mosquitto", "redis", "postgres", "seaweedfs"]
        cycles = 3 if full else 1
        restarts = []
        for _ in range(cycles):
            rng.shuffle(services)
            restarts += [(s, rng.randint(30, 240 if full else 120), round(rng.uniform(0.5, 3.0), 2))
                         for s in services]  # fmt: skip
        kills = [(rng.randint(30, 120), round(rng.uniform(0.0, 0.5), 2),
                  round(rng.uniform(0.5, 3.0), 2)) for _ in range(3 if full else 1)]  # fmt: skip
        agent_kills = [(rng.randint(20, 80), round(rng.uniform(0.0, 0.5), 2),
                        round(rng.uniform(0.5, 3.0), 2))
                       for _ in range(3 if full else 1)]  # fmt: skip
        return cls(
            seed=seed, full=full, devices=6 if full else 3, restarts=restarts,
            ingest_kills=kills, agent_kills=agent_kills,
            worker_kill_delay_s=round(rng.uniform(0.2, 2.0), 2),
            redis_restart_delay_s=round(rng.uniform(0.5, 3.0), 2),
            beat_kill_delay_s=round(rng.uniform(0.0, 2.0), 2),
            cut_fraction=round(rng.uniform(0.45, 0.85), 2), cut_s=round(rng.uniform(2.0, 5.0), 2),
            rollout_mqtt=(round(rng.uniform(0.0, 1.0), 2), round(rng.uniform(0.5, 3.0), 2)),
            rollout_pg=(round(rng.uniform(0.0, 1.0), 2), round(rng.uniform(0.5, 3.0), 2)),
        )  # fmt: skip


@dataclass
class Table:
    """What a chaos run did and found, read back from storage; printed and written."""

    plan: Plan
    faults: list[str] = field(default_factory=list)
    rows: dict[str, object] = field(default_factory=dict)

    def render(self) -> str:
        mode = "--chaos-full" if self.plan.full else "CI"
        lines = [f"chaos run ({mode}, seed {self.plan.seed})", "", "| | |", "|---|---|",
                 f"| faults injected | {len(self.faults)} |"]  # fmt: skip
        lines += [f"| {k} | {v} |" for k, v in self.rows.items()]
        lines += ["", "faults, in order:", *(f"{i + 1}. {f}" for i, f in enumerate(self.faults))]
        return "\n".join(lines)


TABLES: list[str] = []


@pytest.fixture(scope="session")
def chaos_plan(request) -> Plan:
    return Plan.make(SEED, bool(request.config.getoption("--chaos-full", False)))


@pytest.fixture(scope="session")
def private_services(tmp_path_factory):
    """PostgreSQL, Redis, Mosquitto and SeaweedFS of the chaos suite's own, started once."""
    svc = PrivateServices(tmp_path_factory.mktemp("chaos-services").resolve())
    try:
        svc.up(*svc.ports)
        yield svc
    finally:
        svc.down()


@pytest.fixture
def chaos_table(chaos_plan):
    table = Table(chaos_plan)
    yield table
    text = table.render()
    TABLES.append(text)
    out = ROOT / ".edgeloop" / f"chaos-{'full' if chaos_plan.full else 'ci'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def pytest_terminal_summary(terminalreporter):
    for text in TABLES:
        terminalreporter.write_sep("=", "chaos")
        terminalreporter.write_line(text)
