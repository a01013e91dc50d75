"""The production broker for tests: `scripts/services up --production` (the deploy/ config,
TLS, dynamic-security roles) on a spare loopback port with a state folder of its own,
started once per session and stopped after it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from shared.mqtt import MqttOptions, connect_async, make_client

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "scripts" / "services"


def spare_port(below: int = 65536) -> int:
    """A free loopback port below ``below`` (SeaweedFS also takes each port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


@dataclass
class ProductionBroker:
    """A running production broker and the service passwords scripts/certs made for it."""

    state_dir: Path
    port: int
    passwords: dict[str, str] = field(default_factory=dict)  # role → password
    redis_port: int = 0  # set: `start("redis")` runs deploy/redis/ there too
    postgres_port: int = 0  # … and `start("postgres")` deploy/postgres/
    minio_port: int = 0  # … `start("minio")` the TLS S3 (SeaweedFS)
    mlflow_port: int = 0  # … `start("mlflow")` MLflow's basic-auth app over HTTPS
    secrets: dict[str, str] = field(default_factory=dict)  # stack.env, once S3 or MLflow ran
    started_in_s: float = 0.0  # how long `start` took

    @property
    def certs(self) -> Path:
        return self.state_dir / "production" / "certs"

    @property
    def ca_file(self) -> Path:
        return self.certs / "ca.crt"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "EDGELOOP_SERVICES_DIR": str(self.state_dir),
            "EDGELOOP_PRODUCTION_MOSQUITTO_PORT": str(self.port),
            "EDGELOOP_PRODUCTION_REDIS_PORT": str(self.redis_port or spare_port()),
            "EDGELOOP_PRODUCTION_POSTGRES_PORT": str(self.postgres_port or spare_port()),
            **self.s3_ports(),
            "EDGELOOP_PRODUCTION_MLFLOW_PORT": str(self.mlflow_port or spare_port()),
        }

    def s3_ports(self) -> dict[str, str]:
        """The S3 gateway's port and SeaweedFS's inner servers' (each also + 10000), chosen
        once so that `down` finds the same."""
        if not hasattr(self, "_s3_ports"):
            self.minio_port = self.minio_port or spare_port(below=55536)
            self._s3_ports = {"EDGELOOP_PRODUCTION_MINIO_PORT": str(self.minio_port)} | {
                f"EDGELOOP_PRODUCTION_SEAWEEDFS_{name}_PORT": str(spare_port(below=55536))
                for name in ("MASTER", "VOLUME", "FILER")
            }
        return self._s3_ports

    def environ(self) -> dict[str, str]:
        """What `scripts/stack env --native` reads: this stack's folder and ports."""
        return {k: v for k, v in self._env().items() if k.startswith("EDGELOOP_")}

    def services(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SERVICES), *args, "--production"],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=300,  # the whole stack on a loaded machine
        )

    def start(self, *names: str) -> ProductionBroker:
        self.names = names or ("mosquitto",)
        t0 = time.monotonic()
        r = self.services("up", *self.names)
        self.started_in_s = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"scripts/services up --production failed:\n{r.stdout}{r.stderr}")
        for line in (self.certs / "broker.env").read_text().splitlines():
            key, _, value = line.partition("=")
            role = key.removeprefix("EDGELOOP_MQTT_").removesuffix("_PASSWORD").lower()
            self.passwords[role] = value
        for line in (self.certs / "services.env").read_text().splitlines():
            key, _, value = line.partition("=")
            self.passwords[key.removesuffix("_PASSWORD").lower()] = value
        if (self.certs / "stack.env").exists():
            for line in (self.certs / "stack.env").read_text().splitlines():
                key, _, value = line.partition("=")
                self.secrets[key] = value
        return self

    def stop(self) -> None:
        state = json.loads((self.state_dir / "production" / "state.json").read_text())
        self.services("down", *self.names)
        if "postgres" in state:  # as root its cluster lives under the postgres user's home
            shutil.rmtree(Path(state["postgres"]["data"]).parent, ignore_errors=True)

    def options(
        self, username: str | None = None, password: str | None = None, **kw
    ) -> MqttOptions:
        """TLS options for this broker; a service role's password when ``username`` is one."""
        if username is not None and password is None:
            password = self.passwords.get(username)
        return MqttOptions(
            host="localhost",
            port=self.port,
            tls=True,
            ca_file=self.ca_file,
            username=username,
            password=password,
            timeout_s=5,
            **kw,
        )

    def healthcheck(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(ROOT / "deploy" / "mosquitto" / "healthcheck"),
                "localhost",
                str(self.port),
                str(self.ca_file),
                str(self.certs / "health.password"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )


class Client:
    """A paho client that records what happens to it: connection result, granted
    subscriptions, messages, disconnects."""

    def __init__(
        self, options: MqttOptions, *, client_id: str | None = None, clean_session: bool = True
    ) -> None:
        self.client = make_client(
            options,
            client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
            clean_session=clean_session,
        )
        self.options = options
        self.connack = threading.Event()
        self.refused: str | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: list[list[int]] = []
        self.subscribed = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))

    def start(self, *, reconnect: bool = False) -> Client:
        if not reconnect:
            self.client.reconnect_delay_set(60, 60)  # one attempt is all a test looks at
        connect_async(self.client, self.options)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str, timeout: float = 5.0) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic}")
        return self.subacks[-1]

    def publish(self, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
        """Whether the broker took the message (PUBACK) within ``timeout``."""
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
        else:
            self.connected.set()
        self.connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subacks.append([int(getattr(rc, "value", rc)) for rc in reason_codes])
        self.subscribed.set()


def granted(codes: list[int]) -> bool:
    """A SUBACK code that grants the subscription (0-2); 0x80 and above refuse it."""
    return all(code < 0x80 for code in codes)


__all__ = ["Client", "ProductionBroker", "granted", "mqtt", "spare_port"]
