"""The chaos suite's moving parts: devices that upload distinct real windows and remember
what they sent, cloud processes it can SIGKILL, a link that cuts itself mid-update, and the
accounting read back from PostgreSQL and S3."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from cloud.store.db import Sample
from cloud.store.windows import content_sha256
from shared.errors import EdgeloopError
from tests.proxy import TcpProxy


class Uploads:
    """Feeds each uploading agent real TEP fault windows with a little sensor noise (so
    that no two windows a device sends are the same bytes, and a stored twin is a real
    duplicate), ticks every agent, and records each selected window's message id and
    content hash: the ledger the accounting checks storage against."""

    def __init__(self, uploaders, others, windows: np.ndarray, *, seed: int, period_s: float):
        self.uploaders, self.others = uploaders, others
        self.windows, self.period_s = windows, period_s
        self.rng = np.random.default_rng(seed)
        self.noise = 1e-3 * windows.std(axis=(0, 1)).astype(np.float32)  # per channel
        self.sent: dict[str, tuple[str, str]] = {}  # message id → (device, content sha256)
        self.errors = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-uploads", daemon=True)

    def start(self) -> Uploads:
        self.thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            for agent in self.uploaders:
                base = self.windows[i % len(self.windows)]
                window = (base + self.rng.normal(0, 1, base.shape) * self.noise).astype(np.float32)
                try:
                    _, upload = agent.process(window)
                except EdgeloopError:  # a model that fails rolls back on the device
                    self.errors += 1
                    continue
                if upload is not None:
                    self.sent[str(upload.message_id)] = (
                        agent.settings.device_id,
                        content_sha256(window),
                    )
                i += 1
            for agent in (*self.uploaders, *self.others):
                agent.tick()
            self.stop_event.wait(self.period_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


@dataclass
class Accounting:
    sent: int
    stored: int
    lost: list[str]  # message ids sent but absent, or whose object is missing or altered
    duplicated: list[str]  # extra rows of one device's one window, and rows nobody sent
    objects: int  # distinct objects read back
    doubt_stored: int  # windows in doubt at a kill that were stored (and so accepted)


def account(sessions, store, fleet: str, sent: dict[str, tuple[str, str]], ignore: set[str],
            doubt: dict[str, tuple[str, str]]) -> Accounting:  # fmt: skip
    """Read every sample row of ``fleet`` and the window it points at (a row of a batch
    object, by object_index) back from SQL and S3, and compare with what the devices sent
    (``ignore``: rows seeded directly, not sent by a device; ``doubt``: windows an agent
    was killed while making durable, accepted only if stored)."""
    with sessions() as s:
        rows = s.execute(
            select(Sample.id, Sample.device_id, Sample.content_sha256, Sample.object_key,
                   Sample.object_index).where(Sample.fleet == fleet)
        ).all()  # fmt: skip
    rows = [r for r in rows if str(r.id) not in ignore]
    arrays: dict[str, np.ndarray | None] = {}
    for key in {r.object_key for r in rows}:
        try:
            import io

            # allow_pickle=False: stored windows are data, never code.
            arrays[key] = np.load(io.BytesIO(store.get(key)), allow_pickle=False)
        except Exception:  # noqa: BLE001 - a missing or unreadable object is what we count
            arrays[key] = None
    intact: dict[str, tuple[str, str]] = {}
    for r in rows:
        array = arrays[r.object_key]
        if array is None:
            continue
        window = array if r.object_index is None else array[r.object_index]
        if content_sha256(window) == r.content_sha256:
            intact[str(r.id)] = (r.device_id, r.content_sha256)
    sent = {**sent, **{m: who for m, who in doubt.items() if intact.get(m) == who}}
    stored = [m for m, who in sent.items() if intact.get(m) == who]
    lost = [m for m in sent if intact.get(m) != sent[m]]
    per_window = Counter(intact.values())
    duplicated = [m for m, who in intact.items() if m not in sent]  # stored, never sent
    duplicated += [f"{d}:{sha[:12]}×{n}" for (d, sha), n in per_window.items() if n > 1]
    doubt_stored = sum(m in sent for m in doubt)
    return Accounting(len(sent), len(stored), lost, duplicated, len(arrays), doubt_stored)


class CuttingProxy(TcpProxy):
    """A TcpProxy that, once armed, cuts every connection (and refuses new ones) at the
    first bytes the device sends once ``when()`` holds: a link lost in the middle of an
    update, at a point the seed chose. Armed with "k chunks held" on a device that asks for
    one chunk at a time, the request for chunk k never leaves, so exactly k are on its disk
    whatever else (acks, redelivered offers) went down the link. ``start()`` brings it back.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.when: Callable[[], bool] | None = None
        self.received = 0  # bytes towards the device since arm(), for the table
        self.cut = threading.Event()
        self._count_lock = threading.Lock()

    def arm(self, when: Callable[[], bool]) -> None:
        with self._count_lock:
            self.received, self.when = 0, when
        self.cut.clear()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        downstream = src.getpeername()[1] == self.target_port
        try:
            while data := src.recv(65536):
                if not downstream and self._due():
                    self.stop()
                    self.cut.set()
                    return
                dst.sendall(data)
                if downstream:
                    with self._count_lock:
                        self.received += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _due(self) -> bool:
        with self._count_lock:
            if self.when is None or not self.when():
                return False
            self.when = None  # once
            return True


def held_chunks(directory: Path) -> int:
    """The most chunks any one download under ``directory`` has made durable: the distinct
    indices its ``.held`` record lists after its JSON header line (edge_agent.transfer)."""
    return max(
        (len({ln.split()[0] for ln in p.read_text().splitlines()[1:] if ln[:1].isdigit()})
         for p in directory.rglob("*.held")),
        default=0,
    )  # fmt: skip


class Proc:
    """A cloud process of the run (ingest, Celery worker, beat): started, SIGKILLed,
    started again under the same name, its log kept."""

    def __init__(self, name: str, args: list[str], env: dict, logdir: Path) -> None:
        self.name, self.args, self.env, self.logdir = name, args, env, logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.lock = threading.Lock()

    def start(self) -> Proc:
        with self.lock:
            self.starts += 1
            log = (self.logdir / f"{self.name}.{self.starts}.log").open("w")  # noqa: SIM115
            self.proc = subprocess.Popen([sys.executable, *self.args], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def kill(self) -> None:
        with self.lock:
            assert self.proc is not None
            self.proc.kill()  # SIGKILL: no cleanup, no ack
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def exited(self) -> int | None:
        """The exit code of a process that ended on its own (not killed or stopped here)."""
        with self.lock:
            return None if self.proc is None else self.proc.poll()


class Supervisor:
    """Starts again, within a second, a process that exited on its own, as the production
    compose file's `restart: unless-stopped` does; each such exit is recorded (it is a
    finding of the run, not a fault it injected)."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.exits: Counter[str] = Counter()  # process name → exits on its own
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop_event.wait(0.5):
            for p in self.procs:
                code = p.exited()
                if code is not None:
                    self.exits[f"{p.name} (code {code})"] += 1
                    p.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


def connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to loopback ``port``
    (read from /proc: its socket inodes against the kernel's table)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}  # fmt: skip
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            return True
    return False


def logs(logdir: Path, n: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                     for p in sorted(logdir.glob("*.log")))  # fmt: skip
