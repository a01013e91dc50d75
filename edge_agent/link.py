"""The device's MQTT link: QoS 1, persistent session, reconnect with backoff, Last Will."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from shared.messages import Heartbeat
from shared.mqtt import MqttOptions, connect_async, device_client_id, make_client
from shared.topics import Kind, topic

log = logging.getLogger(__name__)


class MqttLink:
    """Publishes under ``edgeloop/v1/{fleet}/{device}/…`` and hands incoming acks and
    updates to ``on_message(kind, payload)`` on paho's network thread."""

    def __init__(
        self,
        *,
        options: MqttOptions,
        fleet: str,
        device: str,
        profile: str,
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self.options = options
        self.host, self.port = options.host, options.port
        self.fleet, self.device = fleet, device
        self.on_message = on_message
        self.connected = threading.Event()
        self.refused: str | None = None  # the broker's reason, while it refuses us
        # clean_session=False: the broker keeps our subscriptions and queues QoS 1 acks and
        # updates while we are offline. The broker binds the device's credentials to this
        # client id (`edgeloop fleet enroll`), so no other device can take the session over.
        self.client = make_client(
            options, client_id=device_client_id(fleet, device), clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(0)
        will = Heartbeat(
            fleet=fleet,
            device_id=device,
            model_version=None,
            profile=profile,
            buffer_depth=0,
            windows_seen=0,
            anomaly_rate=0.0,
            latency_ms_p50=0.0,
            online=False,
        )
        self.client.will_set(self.topic("heartbeat"), will.encode(), qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def topic(self, kind: Kind) -> str:
        return topic(self.fleet, self.device, kind)

    def start(self) -> None:
        connect_async(self.client, self.options)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self, topic_name: str, payload: bytes, *, qos: int = 1, wait_s: float = 0.0
    ) -> bool:
        """Hand a message to paho; False when offline (the buffer will resend it). With
        ``wait_s``, wait that long for the broker's PUBACK."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic_name, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        if wait_s > 0:
            try:
                info.wait_for_publish(wait_s)
            except (RuntimeError, ValueError):  # disconnected meanwhile
                return False
        return True

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.warning("broker refused connection: %s", reason_code)
            return
        self.refused = None
        client.subscribe([(self.topic("acks"), 1), (self.topic("updates"), 1)])
        self.connected.set()
        log.info("connected to %s:%s as %s/%s", self.host, self.port, self.fleet, self.device)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if reason_code != 0:  # 0: we asked to disconnect
            log.warning("disconnected (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            self.on_message(kind, msg.payload)
        except Exception:  # a bad message must never kill the network thread
            log.exception("handling %s message failed", kind)
