"""Departed ingest sessions (issue 16): what the broker sessions of killed ingest processes
cost a fleet's uploads, with sessions that never expire (before) and that expire (after).

Run by ``python bench/ingest.py [--quick] [--departed-only]``, on the bench's own Mosquitto.

For k = 0, 1 and 3, and each configuration in turn (the product's
EDGELOOP_INGEST_SESSION_EXPIRY_S: 4294967295, never, as before issue 16; and the short
``--session-expiry-s``), k + 1 ``edgeloop cloud ingest`` processes join one shared
subscription on their own slots (client ids), then k of them are SIGKILLed: their
sessions stay in the group, taking their turn of the messages, until they expire.

Phase 1, with re-sends: a publisher publishes a paced stream of TEP sample messages QoS 1
from 8 registered devices and, as an edge agent does with its ``resend_after_s``, listens
on the fleet's acks topics and publishes again (same bytes, same message id) whatever is
not acked ``--resend-s`` after it last went out, until every message is acked or a
deadline passes. Latency is from the message's FIRST publish (``time.time()`` in the
publisher) to its samples row's ``received_at`` in PostgreSQL (the ingest's wall clock,
the same machine's, stamped as its batch goes in, milliseconds before the commit);
throughput is stored messages per second from the first publish to the last
``received_at``. Percentiles count a message never stored as infinitely late: a figure
that falls on one is ``null``.

Phase 2, without re-sends, once the short expiry has passed since the kill: a further
stream published once, as a plain publisher would; what storage does not hold is what such
a publisher loses to the departed sessions (before: k of every k + 1 by round robin).

Stored, lost and duplicated are read back from storage with ``reconcile``/``read_back``
(every row's window hashed from the object store), never from counters.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ingest import (
    bench_database,
    drain_bucket,
    ingest_env,
    new_bucket,
    reconcile,
    sample_message,
    wait_subscribed,
)

GROUP = "ingest"
NEVER = 4294967295  # MQTT v5's session expiry that never ends: the sessions before issue 16
DEPARTED = (0, 1, 3)


def percentile(latencies: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q ≤ 1) of ``latencies``, where ``inf`` is a
    message never stored: None when the quantile falls on one."""
    ranked = sorted(latencies)
    value = ranked[max(0, math.ceil(q * len(ranked)) - 1)]
    return None if math.isinf(value) else round(value, 3)


class Device:
    """The fleet's uploads from one MQTT client: publishes QoS 1 at a steady rate and, when
    told to, re-sends what is not acked after ``resend_s`` as an edge agent does."""

    def __init__(self, port: int, fleet: str) -> None:
        import paho.mqtt.client as mqtt

        from shared.topics import subscription

        self.acked: set[str] = set()
        subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex}"
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_ack
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(subscription("acks", fleet=fleet), qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the bench's device did not subscribe to its acks")

    def _on_ack(self, client, userdata, msg) -> None:
        from shared.messages import decode

        ack = decode("acks", msg.payload)
        if ack.status != "retry":  # retry: kept and sent again later, as an agent does
            self.acked.update(map(str, ack.acked_ids))

    def send(
        self,
        messages: list[tuple[str, str, bytes]],
        *,
        rate: float,
        resend_s: float | None,
        deadline_s: float,
    ) -> tuple[dict[str, float], int]:
        """Publish (id, topic, payload) ``messages`` at ``rate`` per second, re-sending after
        ``resend_s`` (None: never), until all are acked or ``deadline_s`` after the last
        first publish. Returns each id's first publish time (``time.time()``) and the
        number of re-sends."""
        first: dict[str, float] = {}
        due: deque[tuple[float, int]] = deque()  # (monotonic re-send time, index), in order
        start = time.monotonic()
        end = math.inf
        resends = sent = 0
        while True:
            now = time.monotonic()
            if sent < len(messages) and now >= start + sent / rate:
                mid, topic, payload = messages[sent]
                first[mid] = time.time()
                self.client.publish(topic, payload, qos=1)
                if resend_s is not None:
                    due.append((now + resend_s, sent))
                sent += 1
                if sent == len(messages):
                    end = now + deadline_s
                continue
            while due and due[0][0] <= now:
                _, i = due.popleft()
                mid, topic, payload = messages[i]
                if mid not in self.acked:
                    self.client.publish(topic, payload, qos=1)
                    due.append((now + resend_s, i))  # type: ignore[operator]
                    resends += 1
            if sent == len(messages) and (
                now > end or all(m in self.acked for m, _, _ in messages)
            ):
                return first, resends
            time.sleep(0.002)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_ingests(
    port: int, fleet: str, db_url: str, bucket: str, expiry_s: int, slots: int, workdir: Path
) -> list[subprocess.Popen]:
    """``slots`` ingest processes in one group, slots 0, 1, …, once each has subscribed."""
    env = ingest_env(db_url, bucket, port, EDGELOOP_INGEST_SESSION_EXPIRY_S=str(expiry_s))
    procs = []
    for slot in range(slots):
        with (workdir / f"ingest-{slot}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", "from shared.cli import main; main()", "cloud"]
                    + ["ingest", "--fleet", fleet, "--group", GROUP, "--slot", str(slot)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    from cloud.ingest.members import ingest_client_id
    from shared.topics import subscription

    samples = subscription("samples", fleet=fleet, shared_group=GROUP)
    lines = [f"{ingest_client_id(GROUP, fleet, s)} 1 {samples}" for s in range(slots)]
    try:
        wait_subscribed(workdir, lines, procs)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


def stored_rows(db_url: str) -> list[tuple[str, str, str, int | None, float]]:
    """(id, content hash, object key, object index, received_at as a Unix time) of every
    samples row."""
    from sqlalchemy import select

    from cloud.store.db import Sample, session_factory

    cols = (Sample.id, Sample.content_sha256, Sample.object_key, Sample.object_index)
    with session_factory(db_url)() as s:
        return [(*r[:4], r[4].timestamp()) for r in s.execute(select(*cols, Sample.received_at))]


def one_run(
    *,
    port: int,
    workdir: Path,
    devices: list[str],
    window: Callable[[int], Any],
    departed: int,
    expiry_s: int,
    wait_s: float,
    resend_s: float,
    sizes: tuple[int, int],
    rate: float,
    deadline_s: float,
) -> dict[str, Any]:
    """Phase 1 (re-sends) and phase 2 (none) with ``departed`` killed sessions in the group
    of one live ingest, all with session expiry ``expiry_s``; phase 2 starts ``wait_s``
    after the kill."""
    from cloud.store.windows import content_sha256
    from shared.topics import topic

    fleet = f"dep{uuid.uuid4().hex[:6]}"
    phases: list[list[tuple[str, str, bytes]]] = [[], []]
    hashes: dict[str, str] = {}
    for phase, size in enumerate(sizes):
        for i in range(size):
            d = devices[i % len(devices)]
            msg = sample_message(fleet, d, window(i + phase * sizes[0]))
            phases[phase].append((str(msg.message_id), topic(fleet, d, "samples"), msg.encode()))
            hashes[str(msg.message_id)] = content_sha256(msg.window.to_array())
    with bench_database(fleet, devices) as url:
        bucket = new_bucket()
        procs = start_ingests(port, fleet, url, bucket, expiry_s, departed + 1, workdir)
        device = None
        try:
            for p in procs[1:]:
                p.send_signal(signal.SIGKILL)  # departed: no DISCONNECT, its session stays
                p.wait(10)
            killed = time.monotonic()
            time.sleep(0.2)  # the broker sees the sockets close
            device = Device(port, fleet)
            first, resends = device.send(
                phases[0], rate=rate, resend_s=resend_s, deadline_s=deadline_s
            )
            time.sleep(max(0.0, killed + wait_s - time.monotonic()))
            device.send(phases[1], rate=rate, resend_s=None, deadline_s=3.0)
            time.sleep(1.0)  # anything late would be a duplicate
        finally:
            if device is not None:
                device.close()
            procs[0].send_signal(signal.SIGTERM)
            procs[0].wait(30)
        rows = stored_rows(url)
    windows, _ = drain_bucket(bucket)
    received = {r[0]: r[4] for r in rows}
    out: dict[str, Any] = {"resends": resends}
    for name, msgs in (("with_resends", phases[0]), ("no_resends", phases[1])):
        ids = {m for m, _, _ in msgs}
        outcome = reconcile(
            [(m, hashes[m]) for m in ids], [r[:4] for r in rows if r[0] in ids], windows
        )
        out[name] = {
            "messages": len(msgs),
            "stored": len(msgs) - outcome["lost"],
            **{k: outcome[k] for k in ("lost", "duplicated", "corrupt")},
        }
    latencies = [received.get(m, math.inf) - t for m, t in first.items()]
    landed = [received[m] for m in first if m in received]
    span = (max(landed) - min(first.values())) if landed else math.inf
    out["with_resends"] |= {
        "throughput": round(len(landed) / span, 1),
        "p50_s": percentile(latencies, 0.50),
        "p99_s": percentile(latencies, 0.99),
        "max_s": percentile(latencies, 1.0),
    }
    return out


def departed_sessions(
    *,
    port: int,
    workdir: Path,
    devices: list[str],
    window: Callable[[int], Any],
    expiry_s: int,
    resend_s: float,
    quick: bool,
) -> dict[str, Any]:
    """Both configurations for 0, 1 and 3 departed sessions, interleaved (one machine load
    for both); the figures by configuration, then by the number departed."""
    sizes, rate, deadline_s = ((300, 100), 100.0, 15.0) if quick else ((1000, 300), 200.0, 30.0)
    results: dict[str, Any] = {
        "publish_rate": rate,
        "resend_s": resend_s,
        "deadline_s": deadline_s,
        "before": {"session_expiry_s": NEVER},
        "after": {"session_expiry_s": expiry_s},
    }
    for k in DEPARTED:
        for config in ("before", "after"):
            print(f"departed sessions: {k}, {config} …", file=sys.stderr)
            results[config][str(k)] = one_run(
                port=port,
                workdir=workdir,
                devices=devices,
                window=window,
                departed=k,
                expiry_s=results[config]["session_expiry_s"],
                wait_s=expiry_s + 1.0,
                resend_s=resend_s,
                sizes=sizes,
                rate=rate,
                deadline_s=deadline_s,
            )
    return results
