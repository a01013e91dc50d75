"""Ingest throughput against the bare broker, in one run, with loss and duplicates counted.

    scripts/services up && python bench/ingest.py [--quick]

The same stream of realistic sample messages (TEP windows, 32 × 53 float32, ~9.6 kB each,
from several devices) is published QoS 1 through a Mosquitto of the bench's own three
times: to a subscriber that only counts them (the bare broker rate), into one real ingest
process (SeaweedFS S3 + PostgreSQL, acks), and into two ingest processes sharing one MQTT
subscription. Rates run from the first publish to the last message counted / stored.
Rows and objects are counted afterwards: `lost` and `duplicated` come from them. Prints
one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"
S3 = f"{HOST}:{os.environ.get('EDGELOOP_SEAWEEDFS_PORT', 8333)}"
S3_KEY = os.environ.get("EDGELOOP_S3_ACCESS_KEY", "edgeloop")
S3_SECRET = os.environ.get("EDGELOOP_S3_SECRET_KEY", "edgeloop-dev-secret")
PG = f"postgresql://postgres@{HOST}:{os.environ.get('EDGELOOP_POSTGRES_PORT', 5432)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} {HOST}",
        "allow_anonymous true",
        "persistence false",
        "max_inflight_messages 1000",
        "max_queued_messages 1000000",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the bench's mosquitto did not start")


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish every message QoS 1 from one client; returns the start time."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(HOST, port)
    client.loop_start()
    t0 = time.perf_counter()
    infos = [client.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    # disconnect() first: it wakes the network loop, which loop_stop() then joins at once
    # (the other order waits out the loop's 1 s select timeout, a second that counted
    # against the ingest rate until this was found).
    client.disconnect()
    client.loop_stop()
    return t0


def bare_rate(port: int, fleet: str, messages: list[tuple[str, bytes]]) -> float:
    import paho.mqtt.client as mqtt

    from shared.topics import subscription

    seen, done, last = [0], threading.Event(), [0.0]

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        seen[0] += 1
        if seen[0] == len(messages):
            last[0] = time.perf_counter()
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-counter")
    sub.on_message = on_message
    sub.connect(HOST, port)
    sub.subscribe(subscription("samples", fleet=fleet, shared_group="bare"), qos=1)
    sub.loop_start()
    time.sleep(0.5)
    t0 = publish_all(port, messages)
    done.wait(300)
    sub.loop_stop()
    return len(messages) / (last[0] - t0)


def ingest_rate(
    port: int, fleet: str, messages, db_url: str, bucket: str, processes: int
) -> tuple[float, int, int, int]:
    """(rate, rows, distinct ids, objects) with ``processes`` ingest processes."""
    from sqlalchemy import func, select

    from cloud.store.db import Sample, session_factory
    from cloud.store.objects import S3ObjectStore

    env = {
        **os.environ,
        "EDGELOOP_DATABASE_URL": db_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": S3,
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": bucket,
        "EDGELOOP_MQTT_PORT": str(port),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from shared.cli import main; main()",
                "cloud",
                "ingest",
                "--fleet",
                fleet,
                "--group",
                "ingest",
                "--client-id",
                f"ingest-{fleet}-{i}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(processes)
    ]
    sessions = session_factory(db_url)
    try:
        time.sleep(3.0)  # connect and subscribe
        t0 = publish_all(port, messages)

        def rows() -> int:
            with sessions() as s:
                return s.scalar(select(func.count()).select_from(Sample)) or 0

        deadline = time.monotonic() + 600
        while rows() < len(messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        time.sleep(1.0)  # anything late would be a duplicate
        with sessions() as s:
            n = s.scalar(select(func.count()).select_from(Sample)) or 0
            distinct = s.scalar(select(func.count(func.distinct(Sample.id)))) or 0
        store = S3ObjectStore(endpoint=S3, access_key=S3_KEY, secret_key=S3_SECRET, bucket=bucket)
        objects = len(store.list("windows/"))
        return len(messages) / elapsed, n, distinct, objects
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 10,000")
    args = parser.parse_args()

    import numpy as np
    import psycopg

    from cloud.store.db import migrate, session_factory
    from cloud.store.records import register_device
    from shared.messages import SampleMessage, Tensor, utcnow
    from shared.topics import topic
    from sim.tep import generate

    n = 5000 if args.quick else 10000
    devices = [f"plant-{i:02d}" for i in range(8)]
    print("simulating TEP windows …", file=sys.stderr)
    data = generate(
        classes=["normal", "idv_01", "idv_02", "idv_07"],
        runs_per_class=2,
        seed=0,
        horizon_h=5.0,
        cache_dir=ROOT / ".edgeloop" / "bench-cache",
        workers=2,
    )
    rng = np.random.default_rng(0)

    def stream(fleet: str) -> list[tuple[str, bytes]]:
        out = []
        for i in range(n):
            # Distinct windows (a little sensor noise on a real one): no accidental dedup.
            w = data.x[i % len(data.x)] + rng.normal(0, 1e-3, data.x.shape[1:]).astype("f4")
            d = devices[i % len(devices)]
            msg = SampleMessage(
                fleet=fleet,
                device_id=d,
                window=Tensor.from_array(w),
                channels=w.shape[1],
                captured_at=utcnow(),
                model_version="v1",
                predicted="normal",
                confidence=0.6,
                score=0.1,
            )
            out.append((topic(fleet, d, "samples"), msg.encode()))
        return out

    results = {"messages": n, "message_bytes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_broker(Path(tmp))
        try:
            fleet = f"bench{uuid.uuid4().hex[:6]}"
            msgs = stream(fleet)
            results["message_bytes"] = len(msgs[0][1])
            print("bare broker …", file=sys.stderr)
            results["bare_rate"] = bare_rate(port, fleet, msgs)
            for procs, name in ((1, "ingest"), (2, "two_process")):
                fleet = f"bench{uuid.uuid4().hex[:6]}"
                msgs = stream(fleet)
                db = f"edgeloop_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{db}"')
                url = f"postgresql+psycopg://postgres@{PG.split('@')[1]}/{db}"
                migrate(url)
                with session_factory(url)() as s:
                    for d in devices:
                        register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
                print(f"{procs} ingest process(es) …", file=sys.stderr)
                try:
                    rate, rows, distinct, objects = ingest_rate(
                        port, fleet, msgs, url, f"bench-{db[-8:]}", procs
                    )
                finally:
                    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                results[f"{name}_rate"] = rate
                results[f"{name}_lost"] = n - distinct
                results[f"{name}_duplicated"] = rows - distinct
                results[f"{name}_objects"] = objects
        finally:
            broker.terminate()
            broker.wait(10)
    results["ratio"] = results["ingest_rate"] / results["bare_rate"]
    results["lost"] = results["ingest_lost"] + results["two_process_lost"]
    results["duplicated"] = results["ingest_duplicated"] + results["two_process_duplicated"]
    results["meets_goals"] = (
        results["ratio"] >= 0.5
        and results["lost"] == 0
        and results["duplicated"] == 0
        and results["two_process_rate"] > results["ingest_rate"]
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
