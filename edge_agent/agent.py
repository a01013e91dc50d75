"""One edge agent: detect on each window, select, buffer durably, upload, take updates."""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from datetime import datetime

import numpy as np

from edge_agent.buffer import DurableBuffer
from edge_agent.config import EdgeSettings
from edge_agent.link import MqttLink
from edge_agent.runtime import Detection, ModelRuntime
from edge_agent.selection import Selector
from edge_agent.updater import ModelSlots
from shared.errors import EdgeloopError, PackageError
from shared.messages import (
    Envelope,
    Heartbeat,
    LabelMessage,
    SampleMessage,
    Tensor,
    UpdateNotice,
    UpdateStatus,
    decode,
    utcnow,
)

log = logging.getLogger(__name__)


class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, link: MqttLink | None = None) -> None:
        self.settings = settings
        s = settings
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
            host=s.mqtt_host,
            port=s.mqtt_port,
            fleet=s.fleet,
            device=s.device_id,
            profile=s.profile,
            on_message=self.on_message,
            keepalive=s.keepalive_s,
            username=s.mqtt_username,
            password=s.mqtt_password,
            tls=s.mqtt_tls,
        )
        self._model_lock = threading.Lock()
        self.runtime: ModelRuntime | None = self.slots.load_active()
        self.latencies_ms: deque[float] = deque(maxlen=512)
        self.windows_seen = 0
        self.anomalies = 0
        self.update_events: list[UpdateStatus] = []
        self._last_heartbeat = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def bootstrap(self, package: bytes) -> None:
        """Install a first model when the device has none (factory image)."""
        if self.runtime is None:
            with self._model_lock:
                self.runtime = self.slots.install(package)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()
        self.buffer.close()

    @property
    def model_version(self) -> str | None:
        return self.runtime.version if self.runtime else None

    # -- the detect → select → buffer path --------------------------------------------------
    def process(
        self, window: np.ndarray, *, captured_at: datetime | None = None
    ) -> tuple[Detection, SampleMessage | None]:
        """Score one (T, C) window; if selected, it is in the durable buffer on return."""
        with self._model_lock:
            runtime = self.runtime
        if runtime is None:
            raise PackageError("no model installed on this device", reason="no_model")
        t0 = time.perf_counter()
        det = runtime.detect(window[None].astype(np.float32, copy=False))[0]
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.windows_seen += 1
        self.anomalies += det.predicted != self.settings.normal_class
        reasons = self.selector.admit(window, det, window.nbytes)
        if not reasons:
            return det, None
        msg = SampleMessage(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            window=Tensor.from_array(window.astype(np.float32, copy=False)),
            channels=window.shape[1],
            captured_at=captured_at or utcnow(),
            model_version=runtime.version,
            predicted=det.predicted,
            confidence=min(1.0, det.confidence),
            score=det.energy,
            reasons=reasons,  # type: ignore[arg-type]
        )
        self._enqueue(msg)
        return det, msg

    def report_label(self, sample_ids: list, label: str) -> LabelMessage:
        """Ground truth known on the device later (a maintenance event) for uploaded windows."""
        msg = LabelMessage(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            sample_ids=tuple(sample_ids),
            label=label,
            source="device",
        )
        self._enqueue(msg)
        return msg

    def _enqueue(self, msg: Envelope) -> None:
        topic = self.link.topic(msg.kind)  # type: ignore[arg-type]
        self.buffer.put(str(msg.message_id), topic, msg.encode())
        self.flush()

    def flush(self) -> int:
        """Send what is due from the buffer; returns how many went to the broker."""
        sent = []
        for p in self.buffer.due(resend_after=self.settings.resend_after_s):
            if not self.link.publish(p.topic, p.payload):
                break
            sent.append(p.message_id)
        if sent:
            self.buffer.mark_sent(sent)
        return len(sent)

    def tick(self) -> None:
        """Periodic work: resend what is due, heartbeat when it is time."""
        self.flush()
        if time.monotonic() - self._last_heartbeat >= self.settings.heartbeat_s:
            self.heartbeat()

    def heartbeat(self) -> Heartbeat:
        self._last_heartbeat = time.monotonic()
        lat = sorted(self.latencies_ms)
        hb = Heartbeat(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            model_version=self.model_version,
            profile=self.settings.profile,
            buffer_depth=self.buffer.depth(),
            windows_seen=self.windows_seen,
            anomaly_rate=self.anomalies / max(1, self.windows_seen),
            latency_ms_p50=lat[len(lat) // 2] if lat else 0.0,
        )
        # Heartbeats are state, not data: the next one supersedes a lost one, so no buffer.
        self.link.publish(self.link.topic("heartbeat"), hb.encode())
        return hb

    # -- from the cloud ---------------------------------------------------------------------
    def on_message(self, kind: str, payload: bytes) -> None:
        if kind == "acks":
            ack = decode("acks", payload)
            self.buffer.ack([str(i) for i in ack.acked_ids])
        elif kind == "updates":
            self.apply_update(payload)

    def apply_update(self, payload: bytes) -> UpdateStatus:
        """Verify and install an update; report the outcome; keep serving on failure."""
        target, status, reason = "unknown", "rejected", None
        try:
            notice: UpdateNotice = decode("updates", payload)
            target = notice.target_version
            if notice.expires_at < utcnow():
                raise PackageError(
                    f"update to {target} expired at {notice.expires_at}", reason="expired"
                )
            if notice.target_version == self.model_version:
                status = "applied"  # redelivered: already live
            else:
                data = base64.b64decode(notice.package, validate=True)
                runtime = self.slots.install(data, expected_sha256=notice.sha256)
                if runtime.version != notice.target_version:
                    self.slots.rollback()
                    raise PackageError(
                        f"package holds version {runtime.version}, the update "
                        f"names {notice.target_version}",
                        reason="wrong_version",
                    )
                with self._model_lock:
                    self.runtime = runtime
                status = "applied"
        except (EdgeloopError, ValueError) as exc:  # ValueError: bad base64
            reason = exc.reason if isinstance(exc, EdgeloopError) else "invalid_update"
            log.warning("update to %s rejected (%s): %s", target, reason, exc)
        report = UpdateStatus(
            fleet=self.settings.fleet,
            device_id=self.settings.device_id,
            target_version=target,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            running_version=self.model_version,
        )
        self.update_events.append(report)
        self._enqueue(report)
        return report
