"""The cloud's one MQTT client for rollouts: publishes update offers, serves the chunks
devices ask for from the object store."""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import timedelta

import paho.mqtt.client as mqtt

from cloud.config import CloudSettings
from cloud.rollout.deltas import object_key_of as delta_object_key
from cloud.store.keys import package_key
from cloud.store.objects import ObjectStore
from shared.errors import EdgeloopError, MessageError
from shared.messages import ChunkRequest, PayloadKind, UpdateChunk, UpdateOffer, decode
from shared.mqtt import MqttOptions, connect_async, make_client
from shared.topics import parse_topic, subscription, topic

log = logging.getLogger(__name__)
# A package target's path, as the signed metadata names it: "{profile}/{version}.edgepkg".
_PACKAGE_PATH = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.edgepkg$"
)


class TransportError(EdgeloopError):
    reason = "broker_unavailable"


@dataclass(frozen=True)
class ServedRequest:
    """A chunk request the transport answered (or refused), as tests and logs see it."""

    fleet: str
    device_id: str
    target: str
    first: int
    count: int
    sent: int  # chunks queued for it (0: refused, or all of them still being served)


class RolloutTransport:
    """Offers go out QoS 1 on each device's ``updates`` topic. Chunk requests come in on a
    shared subscription of every device's ``update-status`` topic (any number of
    transports share the load); paho's thread only queues them, and one server thread
    reads the target from the object store (a few recent targets stay in memory) and
    publishes the chunks asked for. Update statuses on the same topic are the ingest's:
    ignored here. A bad request is logged and counted, never fatal."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        host: str = "127.0.0.1",
        port: int = 1883,
        options: MqttOptions | None = None,  # TLS and credentials; overrides host and port
        client_id: str | None = None,
        chunk_size: int = 64 << 10,
        shared_group: str = "rollout",
        cached_targets: int = 4,
        max_queued: int = 1024,
        repeat_s: float = 0.5,
        pending_ttl_s: float = 60.0,
    ) -> None:
        self.options = options or MqttOptions(host=host, port=port)
        self.host, self.port = self.options.host, self.options.port
        self.store = store
        self.chunk_size = chunk_size
        self.subscription = subscription("update-status", shared_group=shared_group)
        self.ready = threading.Event()  # connected and subscribed
        self.served: deque[ServedRequest] = deque(maxlen=10_000)
        self.chunks_sent = 0
        self.chunks_dropped = 0  # not queued: paho's queue was full (the device asks again)
        self.repeats = 0  # chunks asked again while still being served: not sent twice
        self.bad_requests = 0
        self.last_activity = time.monotonic()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cached_targets
        # (fleet, device, target, index) → the chunk's publish and when it was queued: a
        # chunk asked again within repeat_s, or while the broker has not taken it (up to
        # pending_ttl_s), is not queued again. Devices re-ask every few seconds; without
        # this, one device behind a slow link fills memory with copies of its chunks.
        self._sent: dict[tuple[str, str, str, int], tuple[mqtt.MQTTMessageInfo, float, int]] = {}
        # Counts the transport's connections: what was queued on an earlier one may be lost
        # with it (a broker restart), so a device's request after that is served afresh.
        self._epoch = 0
        self._swept_at = 0.0
        self.repeat_s, self.pending_ttl_s = repeat_s, pending_ttl_s
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self._stopping = threading.Event()
        self._server = threading.Thread(target=self._serve, name="rollout-chunks", daemon=True)
        self.client = make_client(
            self.options,
            client_id=client_id or f"edgeloop-rollout-{uuid.uuid4().hex[:8]}",
            clean_session=client_id is None,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        # Bounded: ~90 MB of 64 KiB chunks at most (offers included); a publish past it
        # fails at once and that chunk is asked for again, never held.
        self.client.max_queued_messages_set(max_queued)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @classmethod
    def from_settings(cls, settings: CloudSettings, *, store: ObjectStore) -> RolloutTransport:
        return cls(
            options=settings.mqtt_options(),
            store=store,
            shared_group=settings.rollout_shared_group,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._server.start()
        connect_async(self.client, self.options)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping.set()
        self._server.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()

    def alive(self, *, idle_s: float = 120.0) -> bool:
        """For a liveness probe: the server thread runs, and the link is up or was active
        within ``idle_s``."""
        if not self._server.is_alive():
            return False
        return self.client.is_connected() or time.monotonic() - self.last_activity < idle_s

    # -- offers ---------------------------------------------------------------------------
    def offer(
        self,
        *,
        fleet: str,
        device_id: str,
        release: int,
        target_path: str,
        length: int,
        bundle: dict[str, str],
        url: str | None = None,
        payload_kind: PayloadKind = "package",
        timeout_s: float = 10.0,
    ) -> None:
        """Publish an UpdateOffer (QoS 1) and wait for the broker to take it; TransportError
        when it does not within ``timeout_s`` (the caller retries: offers are idempotent)."""
        msg = UpdateOffer(
            fleet=fleet,
            device_id=device_id,
            release=release,
            target=target_path,
            payload_kind=payload_kind,
            length=length,
            chunk_size=self.chunk_size,
            metadata=bundle,
            url=url,
        )
        info = self.client.publish(topic(fleet, device_id, "updates"), msg.encode(), qos=1)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"offer to {fleet}/{device_id} not sent: {exc}") from exc
        if not info.is_published():
            raise TransportError(
                f"the broker did not take the offer to {fleet}/{device_id} in {timeout_s} s"
            )
        self.last_activity = time.monotonic()

    # -- serving chunks ---------------------------------------------------------------------
    def target_key(self, fleet: str, target: str) -> str:
        """The object-store key of a target path: a package's or a delta's."""
        delta = delta_object_key(fleet, target)
        if delta is not None:
            return delta
        match = _PACKAGE_PATH.match(target)
        if match is None:
            raise MessageError(
                f"target {target!r} is not a package or delta path", reason="bad_target"
            )
        return package_key(fleet, match.group(1), match.group(2))

    def target_url(
        self, fleet: str, target: str, *, expires: timedelta = timedelta(hours=6)
    ) -> str | None:
        """A presigned GET URL of a target, for devices that can reach object storage
        (None when the store cannot sign one, as a local directory cannot)."""
        presign = getattr(self.store, "presigned_get", None)
        return presign(self.target_key(fleet, target), expires=expires) if presign else None

    def target_bytes(self, fleet: str, target: str) -> bytes:
        key = self.target_key(fleet, target)
        data = self._cache.get(key)
        if data is None:
            data = self.store.get(key)
            self._cache[key] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return data

    def chunk_message(
        self, fleet: str, device_id: str, target: str, index: int, data: bytes
    ) -> UpdateChunk:
        """One chunk as it goes on the wire."""
        return UpdateChunk(
            fleet=fleet,
            device_id=device_id,
            target=target,
            index=index,
            sha256=hashlib.sha256(data).hexdigest(),
            data=base64.b64encode(data).decode("ascii"),
        )

    def serve(self, topic_name: str, payload: bytes) -> int:
        """Answer one message from an ``update-status`` topic; the chunks published."""
        fleet, device_id, _ = parse_topic(topic_name)
        msg = decode("update-status", payload)
        if not isinstance(msg, ChunkRequest):
            return 0  # an UpdateStatus: the ingest records it
        if (msg.fleet, msg.device_id) != (fleet, device_id):
            raise MessageError(
                f"request from {fleet}/{device_id} names {msg.fleet}/{msg.device_id}",
                reason="device_mismatch",
            )
        data = self.target_bytes(fleet, msg.target)
        cs = self.chunk_size
        last = min(msg.first + msg.count, -(-len(data) // cs))
        out = topic(fleet, device_id, "updates")
        now = time.monotonic()
        self._sweep(now)
        sent = 0
        for index in range(msg.first, last):
            key = (fleet, device_id, msg.target, index)
            if self._being_served(key, now):
                self.repeats += 1
                continue
            chunk = self.chunk_message(
                fleet, device_id, msg.target, index, data[index * cs : (index + 1) * cs]
            )
            info = self.client.publish(out, chunk.encode(), qos=1)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self.chunks_dropped += last - index
                log.warning(
                    "outgoing queue full: chunks %d-%d of %s to %s/%s dropped",
                    index,
                    last - 1,
                    msg.target,
                    fleet,
                    device_id,
                )
                break
            self._sent[key] = (info, now, self._epoch)
            sent += 1
        self.chunks_sent += sent
        self.served.append(ServedRequest(fleet, device_id, msg.target, msg.first, msg.count, sent))
        return sent

    def _being_served(self, key: tuple[str, str, str, int], now: float) -> bool:
        entry = self._sent.get(key)
        if entry is None:
            return False
        info, queued_at, epoch = entry
        if epoch != self._epoch:
            return False
        if now - queued_at < self.repeat_s:
            return True
        return now - queued_at < self.pending_ttl_s and _pending(info)

    def _sweep(self, now: float) -> None:
        """Forget chunks no longer being served (once a second: the map is at most the
        queue's size plus what repeat_s holds)."""
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        for key in [k for k in self._sent if not self._being_served(k, now)]:
            del self._sent[key]

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                topic_name, payload = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.last_activity = time.monotonic()
            try:
                self.serve(topic_name, payload)
            except EdgeloopError as exc:
                self.bad_requests += 1
                log.warning("chunk request on %s refused (%s): %s", topic_name, exc.reason, exc)
            except Exception:  # noqa: BLE001 - one bad request must not stop the server
                self.bad_requests += 1
                log.exception("chunk request on %s failed", topic_name)

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the rollout transport: %s", reason_code)
            return
        self._epoch += 1  # one writer (this thread); readers only compare
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.last_activity = time.monotonic()
        self.ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.ready.clear()
        if reason_code != 0:
            log.warning("rollout transport disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self._inbox.put_nowait((msg.topic, msg.payload))
        except queue.Full:  # the device asks again
            self.bad_requests += 1
            log.warning("chunk request on %s dropped: server backlog full", msg.topic)


def _pending(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether paho still holds a publish: queued for the broker or awaiting its ack."""
    if info.rc == mqtt.MQTT_ERR_NO_CONN:
        return True  # queued while offline: paho sends it on the reconnect
    try:
        return not info.is_published()
    except (ValueError, RuntimeError):  # never queued: nothing is pending
        return False
