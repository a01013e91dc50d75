"""Every edgeloop MQTT client is built here, from one set of connection settings: TLS with a
CA file and an optional client certificate, credentials, and timeouts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.errors import ConfigError


@dataclass(frozen=True)
class MqttOptions:
    """Where and how to reach the broker. ``ca_file`` None with TLS on trusts the system
    CAs (a public broker); a private CA needs its file. ``timeout_s`` bounds the TCP and TLS
    connect; ``keepalive_s`` is how soon a silent broker (or client) is noticed."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    timeout_s: float = 10.0
    keepalive_s: int = 30
    system_ca: bool = False  # TLS trusts the system CAs (a broker with a public certificate)

    @classmethod
    def from_settings(
        cls, s: object, *, username: str | None, password: str | None, keepalive_s: int
    ) -> MqttOptions:
        """From a settings object's ``mqtt_*`` fields (the cloud's and the edge's name them
        alike); the login and keepalive are the caller's, which differ."""
        return cls(
            host=s.mqtt_host,  # type: ignore[attr-defined]
            port=s.mqtt_port,  # type: ignore[attr-defined]
            tls=s.mqtt_tls,  # type: ignore[attr-defined]
            ca_file=s.mqtt_ca_file,  # type: ignore[attr-defined]
            system_ca=s.mqtt_system_ca,  # type: ignore[attr-defined]
            cert_file=s.mqtt_cert_file,  # type: ignore[attr-defined]
            key_file=s.mqtt_key_file,  # type: ignore[attr-defined]
            username=username,
            password=password,
            timeout_s=s.mqtt_timeout_s,  # type: ignore[attr-defined]
            keepalive_s=keepalive_s,
        )

    def problems(self, *, production: bool, prefix: str) -> list[str]:
        """What makes these settings unsafe (``prefix``: the env var prefix to name).
        Anything sent over TLS without credentials is refused in every mode: the broker
        would refuse it, and it says a setting is missing."""
        found = []
        if self.tls and not self.username and not self.cert_file:
            found.append(f"{prefix}MQTT_TLS is on but {prefix}MQTT_USERNAME is not set")
        if bool(self.cert_file) != bool(self.key_file):
            found.append(f"{prefix}MQTT_CERT_FILE and {prefix}MQTT_KEY_FILE go together")
        for name, path in (("CA", self.ca_file), ("CERT", self.cert_file), ("KEY", self.key_file)):
            if path is not None and not Path(path).is_file():
                found.append(f"{prefix}MQTT_{name}_FILE {path} does not exist")
        if production:
            if not self.tls:
                found.append(f"{prefix}MQTT_TLS must be true")
            elif not self.ca_file and not self.system_ca:
                found.append(
                    f"{prefix}MQTT_CA_FILE must name the broker's CA (or set "
                    f"{prefix}MQTT_SYSTEM_CA=true for a publicly signed broker)"
                )
            if not self.username or not self.password:
                found.append(f"{prefix}MQTT_USERNAME and {prefix}MQTT_PASSWORD must be set")
        return found


def device_username(fleet: str, device: str) -> str:
    """A device's broker identity: fleet and device (a '/' no service role name has)."""
    return f"{fleet}/{device}"


def device_client_id(fleet: str, device: str) -> str:
    """The client id a device connects with; enrollment binds its credentials to it. '/'
    separates the parts because no fleet or device name holds one ('-' would let fleet
    "plant-a" device "01" and fleet "plant" device "a-01" share an id)."""
    return f"edgeloop/{fleet}/{device}"


def make_client(
    options: MqttOptions,
    *,
    client_id: str,
    clean_session: bool = True,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
) -> mqtt.Client:
    """A paho client with TLS, credentials and timeouts applied; connect it with
    ``connect_async(client, options)``. Refuses TLS without credentials (ConfigError)."""
    problems = options.problems(production=False, prefix="EDGELOOP_")
    if problems:
        raise ConfigError("MQTT settings: " + "; ".join(problems))
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        # MQTTv5 has no clean_session: its clean start and session expiry go with connect.
        clean_session=None if protocol == mqtt.MQTTv5 else clean_session,
        protocol=protocol,
    )
    if options.username:
        client.username_pw_set(options.username, options.password)
    if options.tls:
        # Verifies the broker's certificate and host name against the CA file (or the
        # system CAs), TLS 1.2 at least; a client certificate when one is configured.
        client.tls_set(
            ca_certs=str(options.ca_file) if options.ca_file else None,
            certfile=str(options.cert_file) if options.cert_file else None,
            keyfile=str(options.key_file) if options.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.connect_timeout = options.timeout_s
    return client


def connect_async(
    client: mqtt.Client, options: MqttOptions, *, session_expiry_s: int | None = None
) -> None:
    """Start connecting in the background (paho reconnects by itself after, with the same
    settings). ``session_expiry_s`` (an MQTTv5 client): how long the broker keeps this
    client id's session after the connection drops, resumed on every (re)connect; 0 ends
    it with the connection."""
    if session_expiry_s is None:
        client.connect_async(options.host, options.port, keepalive=options.keepalive_s)
        return
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    client.connect_async(
        options.host,
        options.port,
        keepalive=options.keepalive_s,
        clean_start=session_expiry_s == 0,
        properties=props,
    )
