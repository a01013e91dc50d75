"""One edge agent: detect on each window, select, buffer durably, upload, take updates."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import resource
import threading
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from edge_agent.buffer import DurableBuffer
from edge_agent.config import EdgeSettings
from edge_agent.link import MqttLink
from edge_agent.runtime import Detection, ModelRuntime
from edge_agent.selection import Selector
from edge_agent.updater import ModelSlots
from edge_agent.updates import Updates
from edge_agent.wire import SampleEncoder
from edge_agent.writer import BufferWriter, MessageIds
from shared.errors import DataError, PackageError
from shared.messages import (
    ChunkRequest,
    Envelope,
    Heartbeat,
    LabelMessage,
    UpdateChunk,
    UpdateStatus,
    decode,
    utcnow,
)

log = logging.getLogger(__name__)
# JSON and base64 make a window's message about 4/3 of its raw bytes plus the envelope.
MESSAGE_OVERHEAD_BYTES = 600
try:
    AGENT_VERSION = importlib.metadata.version("edgeloop")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    AGENT_VERSION = "0+unknown"


class Upload(NamedTuple):
    """A window selected for upload: the id its message will carry, and why it was chosen.
    (A named tuple: one is built per upload, at a quarter of a frozen dataclass's cost.)"""

    message_id: uuid.UUID
    reasons: tuple[str, ...]


# A selected window, as the detect path hands it to the writer thread: the upload, a copy
# of the window (little-endian float32 bytes, C order) and its shape, its detection, when it
# was captured, and the model version that saw it.
SampleJob = tuple[Upload, bytes, tuple[int, ...], Detection, datetime, str]
_F32 = np.dtype("<f4")
# What the writer thread makes durable: a selected window, or another message.
Queued = SampleJob | Envelope


def resident_mb() -> float:
    """The process's resident set now, in MiB. Not the peak (ru_maxrss), which an install
    raises for good: the package's bytes held a few times over and two ONNX Runtime
    sessions during the smoke check would read as the live model's footprint."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):  # not Linux: the peak, in KiB there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, link: MqttLink | None = None) -> None:
        self.settings = s = settings
        self.buffer = DurableBuffer(
            s.state_dir / "buffer.sqlite3", max_messages=s.buffer_max_messages
        )
        self.slots = ModelSlots(s.state_dir / "models", profile=s.profile, threads=s.threads)
        self.selector = Selector(
            uncertain_below=s.uncertain_below,
            ood_energy_above=s.ood_energy_above,
            normal_class=s.normal_class,
            bytes_per_hour=s.upload_bytes_per_hour,
            diversity_distance=s.diversity_distance,
        )
        self.link = link or MqttLink(
            options=s.mqtt_options(),
            fleet=s.fleet,
            device=s.device_id,
            profile=s.profile,
            on_message=self.on_message,
        )
        self._model_lock = threading.Lock()  # guards self.runtime
        self._slots_lock = threading.Lock()  # one install or rollback at a time
        self.runtime: ModelRuntime | None = self.slots.load_active()
        # Signed updates: paho's thread hands offers and chunks over; the updater thread
        # verifies, downloads and installs into the spare slot, then calls _swap and _report.
        self.updates = Updates(
            s,
            slots=self.slots,
            slots_lock=self._slots_lock,
            send=self._send_request,
            online=self.link.connected.is_set,
            running=lambda: self.runtime,
            swap=self._swap,
            report=self._report,
        )
        self.inference_errors = 0  # windows the live model failed on (NaN input excluded)
        # message id → when it may be sent again (monotonic); empty after a restart: all go.
        self._inflight: dict[str, float] = {}
        self._inflight_lock = threading.Lock()
        self.latencies_ms: deque[float] = deque(maxlen=512)
        self.windows_seen = 0
        self._ids = MessageIds()
        self.anomalies = 0
        # The last windows' verdicts (1: not normal): the heartbeat's anomaly rate is over
        # these, so a jump shows at once and a restart does not reset a long average.
        self.recent_anomalies: deque[bool] = deque(maxlen=1000)
        self.update_events: list[UpdateStatus] = []
        self._last_heartbeat = 0.0
        # Group commit (edge_agent.writer): the detect path only queues a selected window;
        # a writer thread encodes and commits batches, then sends them.
        self._encoder = SampleEncoder(fleet=s.fleet, device_id=s.device_id)
        self._sample_topic = self.link.topic("samples")
        self.writer: BufferWriter[Queued] = BufferWriter(
            self.buffer,
            encode=self._encode,
            committed=self._send_committed,
            interval_s=s.commit_interval_s,
            batch_size=s.commit_batch,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def bootstrap(self, package: bytes) -> None:
        """Install a first model when the device has none (factory image)."""
        if self.runtime is None:
            with self._model_lock:
                self.runtime = self.slots.install(package)

    def start(self) -> None:
        self.updates.start()
        self.link.start()

    def stop(self) -> None:
        """Stop taking updates, commit what is queued, then close the link and the buffer."""
        self.updates.stop()
        self.writer.stop()
        self.heartbeat(online=False, wait_s=2.0)  # a goodbye; the Last Will covers the rest
        self.link.stop()
        self.buffer.close()

    def backlog(self) -> int:
        """Messages not yet acked by the cloud: queued for the buffer, or in it (while a
        batch commits it may count twice; after sync() it is exact)."""
        return self.writer.pending() + self.buffer.depth()

    def sync(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is durable in the buffer."""
        self.writer.sync(timeout)

    @property
    def enrolled(self) -> bool:
        """Whether the device trusts a fleet root (and so can take signed releases)."""
        return self.updates.trust.enrolled()

    @property
    def model_version(self) -> str | None:
        return self.runtime.version if self.runtime else None

    # -- the detect → select → buffer path --------------------------------------------------
    def process(
        self, window: np.ndarray, *, captured_at: datetime | None = None
    ) -> tuple[Detection, Upload | None]:
        """Score one (T, C) window and select it or not. A selected window's message is
        built and made durable by the writer thread within ``commit_interval_s``
        (``sync()`` waits for it): this path does no encoding and no disk I/O."""
        runtime = self.runtime  # one read of a reference: swaps write it under the lock
        if runtime is None:
            raise PackageError("no model installed on this device", reason="no_model")
        t0 = time.perf_counter()
        try:
            det = runtime.detect(window[None])[0]
        except PackageError as exc:
            # Checked only now, off the common path: NaN in, NaN out is a sensor fault;
            # NaN from finite input is the model's, and it goes.
            if not np.isfinite(window).all():
                raise DataError("window holds NaN or infinity", reason="non_finite") from exc
            self.inference_errors += 1
            self._auto_rollback(runtime, exc)
            raise
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.windows_seen += 1
        anomalous = det.predicted != self.settings.normal_class
        self.anomalies += anomalous
        self.recent_anomalies.append(anomalous)
        size = window.nbytes * 4 // 3 + MESSAGE_OVERHEAD_BYTES
        reasons = self.selector.admit(window, det, size)
        if not reasons:
            return det, None
        upload = Upload(self._ids.next(), reasons)
        # The writer encodes it; the copy because the caller may reuse its array. As bytes,
        # which the encoder takes as they are (tobytes ~0.2 µs, ndarray.copy ~0.5).
        raw = (window if window.dtype is _F32 else window.astype(_F32)).tobytes()  # C order
        self.writer.put((upload, raw, window.shape, det, captured_at or utcnow(), runtime.version))
        return det, upload

    def _encode_sample(self, job: SampleJob, sent_at: datetime) -> tuple[str, str, bytes]:
        """(message id, topic, payload) of a selected window's sample message."""
        upload, raw, shape, det, captured_at, version = job
        message_id = str(upload.message_id)
        payload = self._encoder.encode_raw(
            message_id=message_id,
            data=raw,
            shape=shape,
            captured_at=captured_at,
            model_version=version,
            predicted=det.predicted,
            confidence=min(1.0, det.confidence),
            score=det.scores.get(self.settings.anomaly_score, det.scores["energy"]),
            reasons=upload.reasons,
            sent_at=sent_at,
        )
        return message_id, self._sample_topic, payload

    def report_label(self, sample_ids: list, label: str) -> LabelMessage:
        """Ground truth known on the device later (a maintenance event) for uploaded windows."""
        msg = LabelMessage(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            sample_ids=tuple(sample_ids),
            label=label,
            source="device",
        )
        self.writer.put(msg)
        return msg

    def _encode(self, m: Queued, sent_at: datetime) -> tuple[str, str, bytes]:
        if isinstance(m, tuple):  # a selected window; not isinstance(m, Envelope),
            return self._encode_sample(m, sent_at)  # which goes through ABCMeta
        return str(m.message_id), self.link.topic(m.kind), m.encode()  # type: ignore[arg-type]

    def _send_committed(self, items: list[tuple[str, str, bytes]]) -> None:
        """Send a batch the writer just made durable."""
        if not self.link.connected.is_set():
            return  # offline: tick() sends them once the link is back
        # In flight before the publish: a concurrent flush() must not send them again.
        due = time.monotonic() + self.settings.resend_after_s
        with self._inflight_lock:
            self._inflight.update((message_id, due) for message_id, _, _ in items)
        for message_id, topic, payload in items:
            if not self.link.publish(topic, payload):
                with self._inflight_lock:
                    self._inflight.pop(message_id, None)  # went offline: tick() sends it later

    def _send(self, message_id: str, topic: str, payload: bytes) -> bool:
        if not self.link.publish(topic, payload):
            return False
        with self._inflight_lock:
            self._inflight[message_id] = time.monotonic() + self.settings.resend_after_s
        return True

    def flush(self) -> int:
        """(Re)send buffered messages that are not in flight or whose ack is overdue."""
        now = time.monotonic()
        sent = 0
        if self.buffer.depth() == 0:
            with self._inflight_lock:  # what was evicted unacked leaves no trace here either
                self._inflight.clear()
        for p in self.buffer.pending():
            with self._inflight_lock:
                due = self._inflight.get(p.message_id)
            if due is not None and now < due:
                continue
            if not self._send(p.message_id, p.topic, p.payload):
                break  # offline: the rest waits for the next tick
            sent += 1
        return sent

    def tick(self) -> None:
        """Periodic work: resend what is due, heartbeat when it is time."""
        self.flush()
        if time.monotonic() - self._last_heartbeat >= self.settings.heartbeat_s:
            self.heartbeat()

    def heartbeat(self, *, online: bool = True, wait_s: float = 0.0) -> Heartbeat:
        self._last_heartbeat = time.monotonic()
        lat = sorted(self.latencies_ms)
        recent = len(self.recent_anomalies)
        hb = Heartbeat(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            model_version=self.model_version,
            profile=self.settings.profile,
            buffer_depth=self.backlog(),
            windows_seen=self.windows_seen,
            anomaly_rate=sum(self.recent_anomalies) / max(1, recent),
            latency_ms_p50=lat[len(lat) // 2] if lat else 0.0,
            buffer_evicted=self.buffer.stats().get("evicted", 0),
            skipped_budget=self.selector.skipped_budget,
            skipped_duplicate=self.selector.skipped_duplicate,
            online=online,
            recent_windows=recent,
            latency_ms_p99=lat[min(len(lat) - 1, len(lat) * 99 // 100)] if lat else 0.0,
            memory_mb=resident_mb(),
            inference_errors=self.inference_errors,
            agent_version=AGENT_VERSION,
            capabilities=self.updates.capabilities,
            release=self.updates.last_release(),
        )
        # Heartbeats are state, not data: the next one supersedes a lost one, so no buffer.
        self.link.publish(self.link.topic("heartbeat"), hb.encode(), wait_s=wait_s)
        return hb

    # -- from the cloud ---------------------------------------------------------------------
    def on_message(self, kind: str, payload: bytes) -> None:
        """What the broker delivers, on paho's network thread: nothing here blocks."""
        if kind == "acks":
            ids = list(map(str, (ack := decode("acks", payload)).acked_ids))
            if ack.status == "retry":  # over its upload quota: kept, sent again when told
                due = time.monotonic() + (ack.retry_after_s or self.settings.resend_after_s)
                with self._inflight_lock:
                    self._inflight.update((i, due) for i in ids)
                return
            self.buffer.ack(ids)
            with self._inflight_lock:
                for i in ids:
                    self._inflight.pop(i, None)
        elif kind == "updates":
            msg = decode("updates", payload)
            if isinstance(msg, UpdateChunk):
                self.updates.deliver(msg)
            else:
                self.updates.offer(msg)

    def enroll(self, root: bytes) -> None:
        """Take the fleet's root metadata (``edgeloop fleet enroll`` hands it out)."""
        self.updates.enroll(root)

    def _send_request(self, request: ChunkRequest) -> bool:
        # Not buffered: a lost request is asked again by the download, never replayed late.
        return self.link.publish(self.link.topic("update-status"), request.encode())

    def _swap(self, runtime: ModelRuntime) -> None:
        with self._model_lock:
            self.runtime = runtime
            # The heartbeat's anomaly rate and latencies are the live model's alone.
            self.recent_anomalies.clear()
            self.latencies_ms.clear()

    def _auto_rollback(self, failed: ModelRuntime, exc: PackageError) -> None:
        try:
            with self._slots_lock:
                self._swap(self.slots.rollback())
        except PackageError as no_previous:
            log.error(
                "model %s failed (%s) and cannot roll back: %s", failed.version, exc, no_previous
            )
            return
        log.error(
            "model %s failed on live data (%s); rolled back to %s",
            failed.version,
            exc.reason,
            self.model_version,
        )
        self._report(
            failed.version, "rolled_back", "inference_error", release=self.updates.last_release()
        )

    def _report(
        self,
        target: str,
        status: str,
        reason: str | None,
        *,
        release: int | None = None,
        **transfer: Any,  # payload, received_bytes, delta_refused: how the target arrived
    ) -> UpdateStatus:
        report = UpdateStatus(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            target_version=target,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            running_version=self.model_version,
            release=release,
            **transfer,
        )
        self.update_events.append(report)
        self.writer.put(report)
        return report
