"""A real edge agent in a process of its own, which the chaos suite SIGKILLs and starts
again on the same state directory (its durable buffer, its model slots):

    python -m tests.chaos.device CONFIG.json

It feeds the agent the windows of ``windows`` (an .npy file) with a little sensor noise
and writes a ledger line per selected window: ``P id sha`` before making it durable,
``D id`` once it is in the buffer; a window killed in between is "in doubt" (accepted only
if the cloud stored it). On SIGTERM it stops selecting, waits until the cloud has acked
everything it buffered, writes its model version and package hash to ``status`` and
exits 0."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from cloud.store.windows import content_sha256
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from shared.errors import EdgeloopError


def main(config_path: str) -> int:
    c = json.loads(Path(config_path).read_text())
    agent = EdgeAgent(EdgeSettings(
        fleet=c["fleet"], device_id=c["device"], profile=c["profile"], mqtt_port=c["port"],
        state_dir=Path(c["state_dir"]), heartbeat_s=0.5, resend_after_s=2.0,
        upload_bytes_per_hour=10**10, diversity_distance=0.0))  # fmt: skip
    agent.enroll(Path(c["root"]).read_bytes())
    agent.bootstrap(Path(c["package"]).read_bytes())
    agent.start()
    draining = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: draining.set())
    windows = np.load(c["windows"], allow_pickle=False)  # data, never code
    noise = 1e-3 * windows.std(axis=(0, 1)).astype(np.float32)
    lines = Path(c["ledger"]).read_text().count("\n") if Path(c["ledger"]).exists() else 0
    rng = np.random.default_rng([c["seed"], lines])  # another stream after each restart
    with Path(c["ledger"]).open("a", buffering=1) as ledger:
        i = 0
        while not draining.is_set():
            base = windows[i % len(windows)]
            window = (base + rng.normal(0, 1, base.shape) * noise).astype(np.float32)
            i += 1
            with contextlib.suppress(EdgeloopError):
                _, upload = agent.process(window)
                if upload is not None:
                    ledger.write(f"P {upload.message_id} {content_sha256(window)}\n")
                    agent.sync()
                    ledger.write(f"D {upload.message_id}\n")
            agent.tick()
            draining.wait(c["period_s"])
    agent.sync()
    while agent.backlog() > 0:
        agent.tick()
        threading.Event().wait(0.2)
    runtime = agent.runtime
    Path(c["status"]).write_text(json.dumps({
        "version": agent.model_version,
        "sha256": runtime.package.sha256 if runtime else None}))  # fmt: skip
    agent.stop()
    return 0


def read_ledger(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(durable, in doubt): message id → content sha256."""
    pending: dict[str, str] = {}
    durable: dict[str, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "P":
            pending[parts[1]] = parts[2]
        elif len(parts) == 2 and parts[0] == "D" and parts[1] in pending:
            durable[parts[1]] = pending.pop(parts[1])
    return durable, pending


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
