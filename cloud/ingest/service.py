"""The ingest service: an Ingestor on an MQTT shared subscription (the ingest's one MQTT
client), storing batches and publishing their acks."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from typing import Any

from paho.mqtt.client import MQTTv5, MQTTv311

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.members import CRASH_LIMIT, Membership
from cloud.ingest.outages import TRANSIENT
from cloud.ingest.validate import Receipt, grouped_acks
from shared.errors import MessageError
from shared.mqtt import MqttOptions, connect_async, make_client
from shared.topics import UPLINK_KINDS, subscription, topic

log = logging.getLogger(__name__)
SESSION_TAKEN_OVER = 0x8E  # MQTT v5 DISCONNECT reason: another client took this id


class _Stopping(Exception):
    pass


class IngestService:
    """Runs an Ingestor on an MQTT shared subscription and publishes its acks.

    paho's network thread only queues what arrives; a worker thread takes batches (up to
    ``max_batch``, whatever has arrived), stores each batch with one object write per
    window shape and one transaction, publishes one ack per device and outcome, and only
    then sends the MQTT PUBACKs (manual acks). With a ``client_id`` (its replica slot's) the
    session is MQTT v5's and outlives the process by ``session_expiry_s``: a restart within
    it gets what a killed process had not PUBACKed, and past it the session and its share
    of the group are gone (devices re-send; docs/ingest-sessions.md). ``stop()`` leaves the
    group before it disconnects. When the store or the database is down, the batch is
    retried with backoff (capped at 5 s) until it goes through: nothing is acked meanwhile,
    the broker holds back further messages once its in-flight window is full, and
    everything flows again when the store is back.

    No message stops a worker: whatever a batch raises, its messages are stored one by one
    and the one that fails is dead-lettered (``internal_error``) and PUBACKed, so no session
    holds it for a restart. ``health()`` says whether the workers live (cloud.ingest.health
    serves it).
    """

    stall_s = 120.0  # messages waiting and no batch tried for this long: not alive

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        host: str,
        port: int,
        fleet: str = "+",
        group: str | None = "ingest",
        client_id: str | None = None,
        session_expiry_s: int = 30,
        membership: Membership | None = None,
        options: MqttOptions | None = None,  # TLS and credentials; overrides host and port
        max_batch: int = 500,
        workers: int = 1,
    ) -> None:
        self.ingestor = ingestor
        self.max_batch = max_batch
        self.host, self.port = host, port
        self.subscriptions = [
            subscription(k, fleet=fleet, shared_group=group)  # type: ignore[arg-type]
            for k in UPLINK_KINDS
        ]
        self.ready = threading.Event()
        self.started_at = time.time()
        self.last_batch_at: float | None = None  # when the last batch went through
        self._progress_at = time.monotonic()  # … or a worker last tried one
        self.poison = 0  # messages a worker could neither store nor dead-letter
        self.received = self.handled = 0  # messages from the broker; PUBACKed after a batch
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        # More than one worker lets one parse while another waits for the store; on two
        # cores it measured no faster (docs/benchmarks.md), so one is the default.
        self._workers = [
            threading.Thread(target=self._work, name=f"ingest-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        if membership is not None and workers != 1:
            raise ValueError("an ingest recording what it holds (membership) runs one worker")
        self.options = options or MqttOptions(host=host, port=port)
        # MQTT v5: the broker keeps this client id's session (and, in the group, its share
        # of the messages) session_expiry_s after the connection drops, never longer.
        self.client_id = client_id or f"edgeloop-ingest-{uuid.uuid4().hex[:8]}"
        # Without a client id, a clean 3.1.1 session that ends with the connection (the
        # demo's embedded broker speaks no v5).
        self.session_expiry_s = session_expiry_s if client_id else None
        self.membership = membership
        self.taken_over = threading.Event()  # another process connected with our client id
        self.client = make_client(
            self.options,
            client_id=self.client_id,
            protocol=MQTTv5 if client_id else MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._left = threading.Event()  # the broker confirmed the unsubscribe of stop()
        self.client.on_unsubscribe = lambda *_: self._left.set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="ingest-heartbeat", daemon=True)
        self._suspects: dict[str, int] = {}  # payload sha256 → ingests that died on it
        self._held: list[str] = []  # the payload hashes recorded as in hand

    def start(self) -> None:
        self.ingestor.warm_up()
        if self.membership is not None:
            self.membership.claim()
            self._suspects = self.membership.suspects()
            self._beater.start()
        for worker in self._workers:
            worker.start()
        connect_async(self.client, self.options, session_expiry_s=self.session_expiry_s)
        self.client.loop_start()

    def stop(self, *, drain_s: float = 10.0) -> None:
        """Leave the group, then stop. Unsubscribing first makes the broker hand the
        group's traffic to the other members at once; what had already reached this
        process is stored and PUBACKed (up to ``drain_s``); the session it leaves behind
        holds no subscription, so it takes nothing while it lasts (docs/ingest-sessions.md).
        """
        if self.client.is_connected() and not self.taken_over.is_set():
            self._left.clear()
            self.client.unsubscribe(self.subscriptions)
            self._left.wait(5)
            deadline = time.monotonic() + drain_s
            quiet_at = time.monotonic() + 0.3  # what was on the wire before the UNSUBACK
            while time.monotonic() < deadline:
                if self._inbox.qsize() or self.handled < self.received:
                    quiet_at = time.monotonic() + 0.3
                elif time.monotonic() > quiet_at:
                    break
                time.sleep(0.05)
        self._stopping.set()
        for worker in self._workers:
            worker.join(timeout=30)
        self.client.disconnect()
        self.client.loop_stop()
        if not any(worker.is_alive() for worker in self._workers):
            self.ingestor.close()  # a worker still in a batch may yet write through it
        if self.membership is not None and not any(w.is_alive() for w in self._workers):
            # Only a clean stop releases: a worker stuck on a message leaves its row (and
            # what it holds) for the next process on this client id to count.
            self._beater.join(timeout=10)
            try:
                self.membership.release()
            except Exception:  # noqa: BLE001 - the row then reads "departed", no worse
                log.exception("could not record this ingest's stop")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused this ingest: %s", reason_code)
            return
        client.subscribe([(s, 1) for s in self.subscriptions])
        self.ready.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed.set()  # the broker hands this process its share from now on

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            self._give_up_slot("the broker says another client took the session")

    def _give_up_slot(self, why: str) -> None:
        """Another process connected with this client id (this slot): reconnecting would
        take the session back and forth, each time handing its queue to the other."""
        if self.taken_over.is_set():
            return
        log.error(
            "another ingest runs as %s (%s); this one stops: give each replica its own "
            "--slot (EDGELOOP_INGEST_SLOT)",
            self.client_id,
            why,
        )
        self.taken_over.set()
        self.client.disconnect()  # no reconnect

    def _beat(self) -> None:
        """Record this process in its slot's row every heartbeat (cloud.ingest.members)."""
        assert self.membership is not None
        while not self._stopping.wait(self.membership.heartbeat_s):
            try:
                mine = self.membership.beat(
                    last_batch_at=self.last_batch_at,
                    stored=self.ingestor.counters.stored,
                    received=self.received,
                )
                if not mine:  # Mosquitto 2.0 just closes a taken-over connection
                    self._give_up_slot("a later process claimed its slot")
                    return
                self._suspects = self.membership.suspects()  # other replicas' deaths too
            except Exception as exc:  # noqa: BLE001 - the database may be down: not fatal
                log.warning("ingest heartbeat not recorded: %s", exc)

    def _on_message(self, client, userdata, msg) -> None:
        self.received += 1
        self._inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))

    def health(self) -> dict[str, Any]:
        """Whether the ingest is alive (every worker running, none stuck), and what it did."""
        alive_workers = sum(w.is_alive() for w in self._workers)
        waiting = self._inbox.qsize()
        idle_s = time.monotonic() - self._progress_at
        stuck = waiting > 0 and idle_s > self.stall_s
        c = self.ingestor.counters
        return {
            "alive": alive_workers == len(self._workers)
            and not stuck
            and not self.taken_over.is_set(),
            "client_id": self.client_id,
            "slot": self.membership.slot if self.membership else None,
            "session_expiry_s": self.session_expiry_s,
            "taken_over": self.taken_over.is_set(),
            "workers": len(self._workers),
            "workers_alive": alive_workers,
            "stuck_s": round(idle_s, 1) if stuck else 0.0,
            "connected": self.client.is_connected(),
            "subscribed": self.subscribed.is_set() and self.client.is_connected(),
            "waiting": waiting,
            "last_batch_at": self.last_batch_at,
            "started_at": self.started_at,
            "stored": c.stored,
            "duplicates": c.duplicates,
            "throttled": c.throttled,
            "dead_letters": dict(c.dead_letters),
            "poison": self.poison,
            "received": self.received,
            "handled": self.handled,
        }

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self._inbox.get(timeout=0.2)]
            except queue.Empty:
                self._progress_at = time.monotonic()  # idle is not stuck
                self._hold([])  # nothing in hand now
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                acks = self._store_guarded(batch)
                if acks is None:
                    return  # stopping: un-PUBACKed, so the broker delivers it again later
                self._publish_acks(acks)
            except _Stopping:
                return  # stopping in an outage: un-PUBACKed, delivered again later
            except Exception:  # noqa: BLE001 - the last resort: a worker never dies
                log.exception("batch of %d failed beyond dead-lettering; PUBACKed", len(batch))
                self.poison += len(batch)
            for *_, mid, qos in batch:
                self.client.ack(mid, qos)
            self.handled += len(batch)
            self.last_batch_at = time.time()
            self._progress_at = time.monotonic()
            if self._inbox.empty():
                self._hold([])  # PUBACKed: no longer in hand

    def _store_guarded(self, batch: list[tuple]) -> list[Receipt | None] | None:
        """``_store`` with the batch's payload hashes recorded first (``Membership.hold``),
        so a restart on this client id knows what its predecessor died on. A payload ingests
        died on before is handled alone (a death then names it) and cleared if it goes
        through; one they died on CRASH_LIMIT times is dead-lettered unread
        (``crashed_ingest``) and PUBACKed, so no message restarts an ingest for ever
        (None: stopping)."""
        if self.membership is None:
            return self._store(batch)
        try:
            return self._store_held(batch)
        except _Stopping:
            return None  # un-PUBACKed: the broker delivers it again later

    def _store_held(self, batch: list[tuple]) -> list[Receipt | None] | None:
        assert self.membership is not None
        hashes = [hashlib.sha256(p).hexdigest() for _, p, _, _ in batch]
        receipts: list[Receipt | None] = [None] * len(batch)
        plain: list[int] = []
        alone: list[list[int]] = []
        for i, sha in enumerate(hashes):
            crashes = self._suspects.get(sha)  # None: not a suspect
            if crashes is not None and crashes >= CRASH_LIMIT:
                error = MessageError(
                    f"{crashes} ingest processes died handling this message; not read again",
                    reason="crashed_ingest",
                )
                receipts[i] = self._give_up(batch[i][:2], error)
            elif crashes is not None:
                alone.append([i])
            else:
                plain.append(i)
        for group in [plain, *alone] if plain else alone:
            self._retrying(lambda g=group: self._hold([hashes[i] for i in g], strict=True))
            stored = self._store([batch[i] for i in group])
            if stored is None:
                return None
            for i, receipt in zip(group, stored, strict=True):
                receipts[i] = receipt
            if group is not plain:  # handled alone and survived: it did not kill anyone
                self._acquit(hashes[group[0]])
        return receipts

    def _acquit(self, sha: str) -> None:
        self._suspects.pop(sha, None)
        try:
            assert self.membership is not None
            self.membership.acquit(sha)
        except Exception:  # noqa: BLE001 - it stays a suspect, handled alone: no harm
            log.warning("could not clear suspect %s", sha[:12], exc_info=True)

    def _hold(self, hashes: list[str], *, strict: bool = False) -> None:
        """What this process has in hand, in its membership row (changes only). An outage
        is raised when ``strict`` (the batch waits for the record); any other failure costs
        only the record: the batch is stored all the same."""
        if self.membership is None or hashes == self._held:
            return
        try:
            self.membership.hold(hashes)
            self._held = hashes
        except TRANSIENT:
            if strict:
                raise
        except Exception:  # noqa: BLE001 - storing the batch matters more than the record
            log.warning("could not record the batch this ingest holds", exc_info=True)

    def _store(self, batch: list[tuple]) -> list[Receipt | None] | None:
        """Store a batch, retrying while the database or the store is unreachable. Any
        other failure is about the data: the batch is split, and the message that fails
        on its own is dead-lettered (``internal_error``), so one bad message never blocks
        the rest (None: stopping)."""
        items = [(t, p) for t, p, _, _ in batch]
        try:
            return self._retrying(lambda: self.ingestor.handle_batch(items))
        except _Stopping:
            return None
        except Exception:  # noqa: BLE001 - not an outage: find the message that fails
            log.exception("batch of %d failed; storing its messages one by one", len(items))
        receipts: list[Receipt | None] = []
        for item in items:
            try:
                receipts.append(self._retrying(lambda i=item: self.ingestor.handle_batch([i])[0]))
            except _Stopping:
                return None
            except Exception as exc:  # noqa: BLE001
                log.exception("message on %s cannot be stored", item[0][:300])
                receipts.append(self._give_up(item, exc))
        return receipts

    def _give_up(self, item: tuple[str, bytes], exc: Exception) -> Receipt | None:
        """Dead-letter a message that fails on its own (``internal_error``, or the error
        given), retrying only outages; if even that fails, count it and go on (it is
        PUBACKed either way)."""
        error = exc if isinstance(exc, MessageError) else MessageError(
            f"ingest failed on this message: {exc!r}"[:500], reason="internal_error"
        )  # fmt: skip
        try:
            return self._retrying(lambda: self.ingestor.dead_letter(item[0], item[1], error))
        except _Stopping:
            raise
        except Exception:  # noqa: BLE001
            log.exception("message on %s cannot be dead-lettered either", item[0][:300])
            self.poison += 1
            return None

    def _retrying(self, fn):
        delay = 0.2
        while True:
            self._progress_at = time.monotonic()
            try:
                return fn()
            except TRANSIENT as exc:
                if self._stopping.is_set():
                    raise _Stopping from exc
                log.warning(
                    "database or object store unavailable (%s); retrying in %.1f s", exc, delay
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)

    def _publish_acks(self, receipts: list[Receipt | None]) -> None:
        for ack in grouped_acks(receipts):
            self.client.publish(topic(ack.fleet, ack.device_id, "acks"), ack.encode(), qos=1)
