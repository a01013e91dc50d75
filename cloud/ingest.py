"""MQTT → object storage + SQL: validate, store idempotently, dead-letter, then ack."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import paho.mqtt.client as mqtt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cloud.db import DeadLetter, Device, DeviceUpdate, Label, Sample
from cloud.storage import ObjectStore
from shared.errors import MessageError
from shared.messages import Ack, Heartbeat, LabelMessage, SampleMessage, UpdateStatus, decode
from shared.topics import UPLINK_KINDS, parse_topic, subscription, topic

log = logging.getLogger(__name__)
CLOUD_ID = "cloud"


@dataclass
class IngestCounters:
    stored: int = 0
    duplicates: int = 0
    labels: int = 0
    heartbeats: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)


def window_key(sha: str) -> str:
    return f"windows/{sha[:2]}/{sha}.npy"


def encode_window(window: np.ndarray) -> tuple[str, bytes]:
    """``(sha256, .npy bytes)``; the hash covers dtype, shape and values, so it names content."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(window), allow_pickle=False)
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def load_window(store: ObjectStore, key: str) -> np.ndarray:
    # allow_pickle=False: stored windows are data, never code.
    return np.load(io.BytesIO(store.get(key)), allow_pickle=False)


def upsert_labels(*, session: Session, sample_ids: list[str], label: str, source: str) -> None:
    """Set the label of each sample from ``source``; a later label from the same source
    replaces the earlier one (one row per sample and source)."""
    existing = {
        lab.sample_id: lab
        for lab in session.scalars(
            select(Label).where(Label.sample_id.in_(sample_ids), Label.source == source)
        )
    }
    for sid in sample_ids:
        if sid in existing:
            existing[sid].label = label
        else:
            session.add(Label(sample_id=sid, label=label, source=source))
    session.commit()


def register_device(*, session: Session, device_id: str, fleet: str, profile: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, fleet=fleet, profile=profile)
        session.add(device)
    else:
        device.fleet, device.profile = fleet, profile
    session.commit()
    return device


# A device buffers for days offline, so old is fine up to a limit; the future is not.
MAX_AGE = timedelta(days=30)
MAX_CLOCK_SKEW = timedelta(minutes=5)


def check_timestamps(msg: object) -> None:
    now = datetime.now(UTC)
    for name in ("sent_at", "captured_at"):
        value = getattr(msg, name, None)
        if value is None:
            continue
        if value > now + MAX_CLOCK_SKEW:
            raise MessageError(
                f"{name} {value.isoformat()} is in the future (device clock?)",
                reason="bad_timestamp",
            )
        if value < now - MAX_AGE:
            raise MessageError(
                f"{name} {value.isoformat()} is older than {MAX_AGE.days} days",
                reason="bad_timestamp",
            )


class Ingestor:
    """The ingest logic, free of MQTT: ``handle(topic, payload)`` returns the ack to send.

    Transient failures of the database or the object store propagate (no ack is sent, the
    device resends); anything wrong with the message itself is dead-lettered and acked as
    rejected, so a device never retries it forever.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker,
        store: ObjectStore,
        expected_window: tuple[int, int] | None = None,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.expected_window = expected_window
        self.counters = IngestCounters()

    def handle(self, topic_name: str, payload: bytes) -> Ack | None:
        fleet = device = None
        try:
            fleet, device, kind = parse_topic(topic_name)
            if kind not in UPLINK_KINDS:
                raise MessageError(f"devices may not publish {kind}", reason="bad_kind")
            msg = decode(kind, payload)
            check_timestamps(msg)
            if msg.device_id != device or msg.fleet != fleet:
                raise MessageError(
                    f"message claims device {msg.fleet}/{msg.device_id} but was "
                    f"published under {fleet}/{device}",
                    reason="device_mismatch",
                )
            with self.sessions() as session:
                known = session.get(Device, device)
                if known is None or known.fleet != fleet:
                    raise MessageError(
                        f"device {fleet}/{device} is not registered", reason="unknown_device"
                    )
                if isinstance(msg, SampleMessage):
                    return self._sample(session, msg)
                if isinstance(msg, LabelMessage):
                    return self._labels(session, msg)
                if isinstance(msg, Heartbeat):
                    return self._heartbeat(session, known, msg)
                if isinstance(msg, UpdateStatus):
                    return self._update_status(session, msg)
                raise MessageError(f"unhandled kind {kind}", reason="bad_kind")
        except MessageError as exc:
            return self._dead_letter(topic_name, payload, fleet, device, exc)

    def _ack(self, msg, status: str, reason: str | None = None) -> Ack:  # type: ignore[no-untyped-def]
        return Ack(
            fleet=msg.fleet,
            device_id=msg.device_id,
            acked_ids=(msg.message_id,),
            status=status,
            reason=reason,
        )  # type: ignore[arg-type]

    def _sample(self, session: Session, msg: SampleMessage) -> Ack:
        if session.get(Sample, str(msg.message_id)) is not None:
            self.counters.duplicates += 1
            return self._ack(msg, "duplicate")
        window = msg.window.to_array()
        if window.ndim != 2 or window.shape[1] != msg.channels:
            raise MessageError(
                f"window shape {window.shape} is not (T, {msg.channels})", reason="bad_shape"
            )
        if self.expected_window and tuple(window.shape) != self.expected_window:
            raise MessageError(
                f"window shape {window.shape} is not the fleet's {self.expected_window}",
                reason="bad_shape",
            )
        sha, data = encode_window(window)
        key = window_key(sha)
        if not self.store.exists(key):  # same window from two devices: stored once
            self.store.put(key, data)
        session.add(
            Sample(
                id=str(msg.message_id),
                device_id=msg.device_id,
                fleet=msg.fleet,
                content_sha256=sha,
                object_key=key,
                dtype=str(window.dtype),
                shape=list(window.shape),
                captured_at=msg.captured_at,
                model_version=msg.model_version,
                predicted=msg.predicted,
                confidence=msg.confidence,
                score=msg.score,
                reasons=list(msg.reasons),
            )
        )
        try:
            session.commit()
        except IntegrityError:  # a second ingest process stored it first
            session.rollback()
            self.counters.duplicates += 1
            return self._ack(msg, "duplicate")
        self.counters.stored += 1
        return self._ack(msg, "stored")

    def _labels(self, session: Session, msg: LabelMessage) -> Ack | None:
        ids = [str(i) for i in msg.sample_ids]
        found = set(session.scalars(select(Sample.id).where(Sample.id.in_(ids))))
        if len(found) != len(ids):
            # The samples are still on their way (or in another ingest's transaction): no
            # ack, the device resends the label later.
            return None
        upsert_labels(session=session, sample_ids=ids, label=msg.label, source=msg.source)
        self.counters.labels += len(ids)
        return self._ack(msg, "stored")

    def _heartbeat(self, session: Session, device: Device, msg: Heartbeat) -> None:
        device.last_seen = msg.sent_at
        device.online = msg.online
        if msg.model_version is not None:
            device.model_version = msg.model_version
        device.health = msg.model_dump(
            mode="json", include={"buffer_depth", "windows_seen", "anomaly_rate", "latency_ms_p50"}
        )
        session.commit()
        self.counters.heartbeats += 1
        return None  # heartbeats are never buffered on the device, so never acked

    def _update_status(self, session: Session, msg: UpdateStatus) -> Ack:
        row = session.scalars(
            select(DeviceUpdate).where(
                DeviceUpdate.device_id == msg.device_id,
                DeviceUpdate.target_version == msg.target_version,
            )
        ).first()
        if row is None:
            row = DeviceUpdate(device_id=msg.device_id, target_version=msg.target_version)
            session.add(row)
        row.state, row.reason = msg.status, msg.reason
        device = session.get(Device, msg.device_id)
        if device is not None and msg.running_version:
            device.model_version = msg.running_version
        session.commit()
        return self._ack(msg, "stored")

    def _dead_letter(
        self,
        topic_name: str,
        payload: bytes,
        fleet: str | None,
        device: str | None,
        exc: MessageError,
    ) -> Ack | None:
        key = f"dead-letters/{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4()}.bin"
        self.store.put(key, payload)
        with self.sessions() as session:
            session.add(
                DeadLetter(
                    fleet=fleet,
                    device_id=device,
                    topic=topic_name[:300],
                    reason=exc.reason,
                    detail=str(exc)[:2000],
                    payload_key=key,
                )
            )
            session.commit()
        self.counters.dead_letters[exc.reason] = self.counters.dead_letters.get(exc.reason, 0) + 1
        log.info("dead letter from %s/%s: %s", fleet, device, exc)
        message_id = _peek_message_id(payload)
        if fleet and device and message_id and exc.reason not in ("device_mismatch",):
            # Rejected, so the device drops it from its buffer instead of resending forever.
            return Ack(
                fleet=fleet,
                device_id=device,
                acked_ids=(message_id,),
                status="rejected",
                reason=exc.reason,
            )
        return None


def _peek_message_id(payload: bytes) -> uuid.UUID | None:
    try:
        value = json.loads(payload)
        return uuid.UUID(str(value["message_id"]))
    except (ValueError, KeyError, TypeError):
        return None


class IngestService:
    """Runs an Ingestor on an MQTT shared subscription and publishes its acks."""

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        host: str,
        port: int,
        fleet: str = "+",
        group: str | None = "ingest",
        client_id: str | None = None,
        retry_for_s: float = 20.0,
    ) -> None:
        """``client_id``: a stable id gives a persistent session, so messages the broker
        handed to a killed ingest are delivered again when it comes back."""
        self.ingestor = ingestor
        self.retry_for_s = retry_for_s
        self.host, self.port = host, port
        self.subscriptions = [
            subscription(k, fleet=fleet, shared_group=group)  # type: ignore[arg-type]
            for k in UPLINK_KINDS
        ]
        self.ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgeloop-ingest-{uuid.uuid4().hex[:8]}",
            clean_session=client_id is None,
            protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        # PUBACK only after the message is stored (or dead-lettered): a broker that saw no
        # PUBACK delivers the message again after a reconnect.
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        client.subscribe([(s, 1) for s in self.subscriptions])
        self.ready.set()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        delay, deadline = 0.2, time.monotonic() + self.retry_for_s
        while True:
            try:
                ack = self.ingestor.handle(msg.topic, msg.payload)
                break
            except Exception as exc:  # noqa: BLE001 - the database or the store is down
                if time.monotonic() + delay > deadline:
                    # No ack either way: the device resends, the broker redelivers on the
                    # next connection; meanwhile the ingest goes on with other messages.
                    log.warning("could not store %s (%s); left un-acked", msg.topic, exc)
                    return
                log.info("store or database unavailable (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if ack is not None:
            client.publish(topic(ack.fleet, ack.device_id, "acks"), ack.encode(), qos=1)
        client.ack(msg.mid, msg.qos)
