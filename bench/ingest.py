"""Ingest throughput against the bare broker, in one run, with loss, duplicates and damage
counted by reading storage back.

    scripts/services up && python bench/ingest.py [--quick]

The same stream of realistic sample messages (TEP windows, 32 × 53 float32, ~9.4 kB each,
from several devices) is published QoS 1 through a Mosquitto of the bench's own three
times: to a subscriber in a process of its own that only counts them (the bare broker
rate), into one real ingest process (SeaweedFS S3 + PostgreSQL, acks), and into two ingest
processes sharing one MQTT subscription. Rates run from the first publish to the last
message counted / stored (one monotonic clock, shared by the processes).

Outcomes are counted from storage, not from counters: every stored object is read back
through the product's object store client, every window in it hashed, and each published
window's content hash matched against the rows that name it and the object slots those
rows point to. A published window with no row whose stored bytes hash to it is `lost`; a
hash in more rows than it was published is `duplicated`; a row whose window reads back
as other bytes, or an object that does not decode, is `corrupt`.

Then (alone with ``--departed-only``) the departed ingest sessions of issue 16: throughput
and publish → stored latency with 0, 1 and 3 killed ingests in the group, their sessions
never expiring and expiring (bench/ingest_departed.py, under "departed"). Prints one JSON
object on the last line.
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
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
        # Subscriptions are logged: the bench starts publishing once every ingest has
        # subscribed (a shared subscription drops what arrives before any member).
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type subscribe",
        "log_type error",
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


def ingest_env(db_url: str, bucket: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of an ingest process storing to ``db_url`` and S3 ``bucket``,
    subscribed through the bench's broker on ``port``."""
    return {
        **os.environ,
        "EDGELOOP_DATABASE_URL": db_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": S3,
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": bucket,
        "EDGELOOP_MQTT_PORT": str(port),
        **extra,
    }


def new_bucket() -> str:
    """A bucket made here, before the ingests start: processes making it together race
    (check, then create) and the loser exits with BucketAlreadyOwnedByYou."""
    from cloud.store.objects import S3ObjectStore

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    S3ObjectStore(endpoint=S3, access_key=S3_KEY, secret_key=S3_SECRET, bucket=bucket)
    return bucket


def drain_bucket(bucket: str) -> tuple[dict[tuple[str, int | None], str | None], int]:
    """``read_back`` of an ingest's bucket, which is then emptied and removed."""
    from cloud.store.objects import S3ObjectStore

    store = S3ObjectStore(endpoint=S3, access_key=S3_KEY, secret_key=S3_SECRET, bucket=bucket)
    try:
        return read_back(store)
    finally:
        for key in store.list():
            store.delete(key)
        store.client.remove_bucket(bucket)


@contextmanager
def bench_database(fleet: str, devices: list[str]) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated, with ``devices`` registered in ``fleet``
    (ingest takes messages only from registered devices); dropped on the way out."""
    import psycopg

    from cloud.config import get_settings
    from cloud.store.connect import pg_connect_args
    from cloud.store.db import migrate, session_factory
    from cloud.store.records import register_device

    pg_args = pg_connect_args(get_settings())  # TLS and timeout, as the services use
    db = f"edgeloop_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True, **pg_args) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        url = f"postgresql+psycopg://postgres@{PG.split('@')[1]}/{db}"
        migrate(url)
        with session_factory(url)() as s:
            for d in devices:
                register_device(session=s, device_id=d, fleet=fleet, profile="cpu-fp32")
        yield url
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True, **pg_args) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def sample_message(fleet: str, device: str, window: Any) -> Any:
    """A device's upload of ``window`` (a (T, C) float32 array), as the edge agent sends it."""
    from shared.messages import SampleMessage, Tensor, utcnow

    return SampleMessage(
        fleet=fleet,
        device_id=device,
        window=Tensor.from_array(window),
        channels=window.shape[1],
        captured_at=utcnow(),
        model_version="v1",
        predicted="normal",
        confidence=0.6,
        score=0.1,
    )


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish every message QoS 1 from one client; returns the start time (monotonic)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(HOST, port)
    client.loop_start()
    t0 = time.monotonic()
    infos = [client.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    # disconnect() first: it wakes the network loop, which loop_stop() then joins at once
    # (the other order waits out the loop's 1 s select timeout, a second that counted
    # against the ingest rate until this was found).
    client.disconnect()
    client.loop_stop()
    return t0


def count_messages(port: int, fleet: str, n: int, ready: Any, result: Any) -> None:
    """The bare subscriber, run in a process of its own: counts ``n`` messages and puts
    the monotonic time of the last one (CLOCK_MONOTONIC on Linux: one clock for every
    process, so the parent's publish start and this end can be subtracted)."""
    import paho.mqtt.client as mqtt

    from shared.topics import subscription

    seen = [0]

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        ready.set()

    def on_message(client, userdata, msg):
        seen[0] += 1
        if seen[0] == n:
            result.put(time.monotonic())

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex}")
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect(HOST, port)
    sub.subscribe(subscription("samples", fleet=fleet, shared_group="bare"), qos=1)
    sub.loop_forever()  # ended by the parent once it has the result


def bare_rate(port: int, fleet: str, messages: list[tuple[str, bytes]]) -> float:
    """Messages per second through the broker to a subscriber in another process, so that
    it does not share the publisher's interpreter (and GIL)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, result = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=count_messages, args=(port, fleet, len(messages), ready, result))
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the bare subscriber did not subscribe")
        t0 = publish_all(port, messages)
        last = result.get(timeout=300)
    finally:
        proc.terminate()
        proc.join(10)
    return len(messages) / (last - t0)


def reconcile(
    published: list[tuple[str, str]],
    rows: list[tuple[str, str, str, int | None]],
    windows: dict[tuple[str, int | None], str | None],
) -> dict[str, int]:
    """Match what was published with what storage holds, each published window once.

    ``published``: (message id, content hash) of every message sent. ``rows``: (id,
    content hash, object key, object index) of every sample row. ``windows``: for every
    window read back from the object store, (object key, index; None for a whole-object
    window) → the hash of its bytes, or None where the object did not decode.
    """
    sent = Counter(sha for _, sha in published)
    sent_ids = dict(published)
    in_rows: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    referenced: set[tuple[str, int | None]] = set()
    corrupt = missing = unexpected = 0
    for row_id, sha, key, index in rows:
        in_rows[sha] += 1
        if sent_ids.get(row_id) != sha:
            unexpected += 1  # an id never published, or published with other content
        slot = (key, index)
        referenced.add(slot)
        if slot not in windows:
            missing += 1  # the row points at no stored window
        elif windows[slot] != sha:
            corrupt += 1  # the stored bytes are not the window the row names (or no .npy)
        else:
            verified[sha] += 1
    undecoded = sum(1 for slot, sha in windows.items() if sha is None and slot not in referenced)
    return {
        "lost": sum(max(0, n - verified[sha]) for sha, n in sent.items()),
        "duplicated": sum(max(0, n - sent[sha]) for sha, n in in_rows.items()),
        "corrupt": corrupt + undecoded,  # undecodable objects no row named are damage too
        "missing_objects": missing,
        "unexpected_rows": unexpected,
        "orphan_windows": len(windows.keys() - referenced),
        "rows": len(rows),
    }


def read_back(store: Any) -> tuple[dict[tuple[str, int | None], str | None], int]:
    """Every stored window's content hash, by (object key, index), read through the
    product's object store client and window loader; and the number of objects read."""
    from cloud.store.windows import content_sha256, load_window

    windows: dict[tuple[str, int | None], str | None] = {}
    keys = store.list("windows/")
    for key in keys:
        try:
            array = load_window(store, key)
        except ValueError:  # not a .npy (np.load refuses it): corrupt, counted as such
            windows[(key, None)] = None
            continue
        if array.ndim == 2:
            windows[(key, None)] = content_sha256(array)
        else:
            for index, window in enumerate(array):
                windows[(key, index)] = content_sha256(window)
    return windows, len(keys)


def wait_subscribed(workdir: Path, lines: list[str], procs: list[subprocess.Popen]) -> None:
    """Wait until the bench's broker has logged every line of ``lines`` (one subscription
    each); an ingest that exits first, or a minute without them, stops the bench."""
    log = workdir / "mosquitto.log"
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text() if log.exists() else ""
        if all(line in text for line in lines):
            return
        for i, p in enumerate(procs):
            if p.poll() is not None:
                tail = (workdir / f"ingest-{i}.log").read_text()[-2000:]
                raise RuntimeError(f"ingest process {i} exited ({p.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ingest processes did not subscribe: {lines}")
        time.sleep(0.05)


def ingest_rate(
    port: int,
    fleet: str,
    messages: list[tuple[str, bytes]],
    published: list[tuple[str, str]],
    db_url: str,
    bucket: str,
    processes: int,
    workdir: Path,
) -> tuple[float, dict[str, int]]:
    """(rate, outcomes read back from storage) with ``processes`` ingest processes."""
    from sqlalchemy import func, select

    from cloud.store.db import Sample, session_factory
    from shared.topics import subscription

    env = ingest_env(db_url, bucket, port)
    logs = [(workdir / f"ingest-{i}.log").open("wb") for i in range(processes)]
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
            stderr=logs[i],
        )
        for i in range(processes)
    ]
    sessions = session_factory(db_url)
    samples = subscription("samples", fleet=fleet, shared_group="ingest")
    try:
        wait_subscribed(
            workdir, [f"ingest-{fleet}-{i} 1 {samples}" for i in range(processes)], procs
        )
        t0 = publish_all(port, messages)

        def rows() -> int:
            with sessions() as s:
                return s.scalar(select(func.count()).select_from(Sample)) or 0

        deadline = time.monotonic() + 600
        progress = (0, time.monotonic())
        while (n := rows()) < len(messages) and time.monotonic() < deadline:
            if n > progress[0]:
                progress = (n, time.monotonic())
            elif time.monotonic() - progress[1] > 60:
                break  # stalled: whatever is missing is counted as lost below
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # anything late would be a duplicate
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        for f in logs:
            f.close()
    with sessions() as s:
        stored = [
            (r.id, r.content_sha256, r.object_key, r.object_index)
            for r in s.execute(
                select(Sample.id, Sample.content_sha256, Sample.object_key, Sample.object_index)
            )
        ]
    windows, objects = drain_bucket(bucket)
    outcome = reconcile(published, stored, windows)
    if outcome["lost"] or outcome["duplicated"] or outcome["corrupt"]:
        for i in range(processes):  # the ingests' own account, before the folder goes
            tail = (workdir / f"ingest-{i}.log").read_text(errors="replace")[-3000:]
            print(f"--- ingest process {i}:\n{tail}", file=sys.stderr)
    outcome |= {"objects_checked": objects, "windows_checked": len(windows)}
    return len(messages) / elapsed, outcome


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 10,000")
    parser.add_argument(
        "--departed-only",
        action="store_true",
        help="only the departed-sessions scenario (issue 16; bench/ingest_departed.py)",
    )
    parser.add_argument(
        "--session-expiry-s",
        type=int,
        default=5,
        help="EDGELOOP_INGEST_SESSION_EXPIRY_S of the 'after' configuration (product: 30)",
    )
    parser.add_argument(
        "--resend-s",
        type=float,
        default=3.0,
        help="the departed scenario's publisher re-sends what is not acked after this "
        "(edge agents: resend_after_s, 10)",
    )
    args = parser.parse_args()

    import numpy as np

    from bench.ingest_departed import departed_sessions
    from cloud.store.windows import content_sha256
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

    def window(i: int) -> Any:
        # Distinct windows (a little sensor noise on a real one): no accidental dedup.
        return data.x[i % len(data.x)] + rng.normal(0, 1e-3, data.x.shape[1:]).astype("f4")

    def stream(fleet: str) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
        """The messages (topic, payload), and (message id, content hash) of each."""
        out, published = [], []
        for i in range(n):
            d = devices[i % len(devices)]
            msg = sample_message(fleet, d, window(i))
            out.append((topic(fleet, d, "samples"), msg.encode()))
            # The hash of the window as the ingest decodes it from the wire.
            published.append((str(msg.message_id), content_sha256(msg.window.to_array())))
        return out, published

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_broker(Path(tmp))
        try:
            if not args.departed_only:
                results = throughput(port, Path(tmp), n, devices, stream)
            results["departed"] = departed_sessions(
                port=port,
                workdir=Path(tmp),
                devices=devices,
                window=window,
                expiry_s=args.session_expiry_s,
                resend_s=args.resend_s,
                quick=args.quick,
            )
        finally:
            broker.terminate()
            broker.wait(10)
    print(json.dumps(results))


def throughput(port: int, workdir: Path, n: int, devices: list[str], stream: Any) -> dict:
    """The bare broker's rate, then one and two ingest processes', with their outcomes."""
    fleet = f"bench{uuid.uuid4().hex[:6]}"
    msgs, _ = stream(fleet)
    results: dict[str, Any] = {"messages": n, "message_bytes": len(msgs[0][1])}
    print("bare broker (its subscriber in a process of its own) …", file=sys.stderr)
    results["bare_rate"] = bare_rate(port, fleet, msgs)
    for procs, name in ((1, "ingest"), (2, "two_process")):
        fleet = f"bench{uuid.uuid4().hex[:6]}"
        msgs, published = stream(fleet)
        print(f"{procs} ingest process(es) …", file=sys.stderr)
        with bench_database(fleet, devices) as url:
            rate, outcome = ingest_rate(
                port, fleet, msgs, published, url, new_bucket(), procs, workdir
            )
        results[f"{name}_rate"] = rate
        results |= {f"{name}_{k}": v for k, v in outcome.items()}
    results["ratio"] = results["ingest_rate"] / results["bare_rate"]
    for figure in ("objects_checked", "windows_checked", "lost", "duplicated", "corrupt"):
        results[figure] = results[f"ingest_{figure}"] + results[f"two_process_{figure}"]
    results["meets_goals"] = (
        results["ratio"] >= 0.5
        and results["lost"] == 0
        and results["duplicated"] == 0
        and results["corrupt"] == 0
        and results["windows_checked"] >= 2 * n  # every published window was read back
        and results["two_process_rate"] > results["ingest_rate"]
    )
    return results


if __name__ == "__main__":
    main()
