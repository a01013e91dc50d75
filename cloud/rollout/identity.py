"""Device identities on the broker: the enrollment's one MQTT client, which creates,
disables and deletes devices' clients of Mosquitto's dynamic-security plugin over
``$CONTROL/dynamic-security/v1`` (as the admin role of deploy/mosquitto/roles.json).

Each device gets a role of its own naming its six topics literally (the plugin in
Mosquitto 2.0 does not substitute ``%u`` in role ACLs: measured on 2.0.11, a ``%u`` ACL
matched nothing), and a client bound to the client id the edge connects with, so its
password works for no other session. Disabling or deleting a client disconnects it at once.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from shared.errors import EdgeloopError
from shared.mqtt import MqttOptions, connect_async, device_client_id, device_username, make_client
from shared.topics import TOPIC_ROOT, UPLINK_KINDS, Kind, check_name, topic

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
# What a delete answers when there is nothing to delete: enrolling anew is idempotent.
_ABSENT = ("not found",)


class IdentityError(EdgeloopError):
    reason = "broker_identity"


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device logs in with (the password leaves this process only in its file)."""

    username: str
    password: str
    client_id: str


def device_role(fleet: str, device: str) -> str:
    return f"device/{fleet}/{device}"


def device_acls(fleet: str, device: str) -> list[dict[str, Any]]:
    """Publish its uploads, read its acks and updates: its own topics and nothing else."""
    check_name(fleet, "fleet")
    check_name(device, "device")
    acls: list[dict[str, Any]] = [
        {"acltype": "publishClientSend", "topic": own, "allow": True}
        for own in (f"{TOPIC_ROOT}/{fleet}/{device}/{k}" for k in UPLINK_KINDS)
    ]
    downlink: tuple[Kind, ...] = ("acks", "updates")
    for kind in downlink:
        own = topic(fleet, device, kind)
        acls += [
            {"acltype": "subscribeLiteral", "topic": own, "allow": True},
            {"acltype": "publishClientReceive", "topic": own, "allow": True},
        ]
    return acls


class BrokerAdmin:
    """A short-lived admin session: ``with BrokerAdmin(options) as admin: admin.issue(…)``.
    Every command waits for the plugin's answer and raises IdentityError on a refusal."""

    def __init__(self, options: MqttOptions, *, timeout_s: float = 10.0) -> None:
        if not options.username:
            raise IdentityError(
                "no broker admin identity: set EDGELOOP_MQTT_ADMIN_USERNAME and "
                "EDGELOOP_MQTT_ADMIN_PASSWORD (scripts/certs wrote them to broker.env)"
            )
        self.options, self.timeout_s = options, timeout_s
        self._answers: dict[str, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self.client = make_client(
            options, client_id=f"edgeloop-enroll-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message

    def __enter__(self) -> BrokerAdmin:
        connect_async(self.client, self.options)
        self.client.loop_start()
        if not self._subscribed.wait(self.timeout_s):
            self.close()
            why = self._refused or "no answer"
            raise IdentityError(
                f"cannot reach the broker's dynamic-security plugin at {self.options.host}:"
                f"{self.options.port} as {self.options.username} ({why})"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- what enrollment and revocation do -------------------------------------------------
    def issue(self, fleet: str, device: str) -> DeviceCredentials:
        """New credentials for a device (any earlier ones stop working, and a session
        logged in with them is disconnected)."""
        creds = DeviceCredentials(
            username=device_username(fleet, device),
            password=secrets.token_urlsafe(24),
            client_id=device_client_id(fleet, device),
        )
        role = device_role(fleet, device)
        self.run([{"command": "deleteClient", "username": creds.username}], tolerate=_ABSENT)
        self.run([{"command": "deleteRole", "rolename": role}], tolerate=_ABSENT)
        self.run(
            [
                {"command": "createRole", "rolename": role, "acls": device_acls(fleet, device)},
                {
                    "command": "createClient",
                    "username": creds.username,
                    "password": creds.password,
                    "clientid": creds.client_id,
                    "textname": f"device {device} of fleet {fleet}",
                    "roles": [{"rolename": role}],
                },
            ]
        )
        return creds

    def revoke(self, fleet: str, device: str) -> None:
        """Disable the device's client: the broker disconnects it now and refuses it from
        then on (enrolling it again issues new credentials)."""
        self.run([{"command": "disableClient", "username": device_username(fleet, device)}])

    def run(self, commands: list[dict[str, Any]], *, tolerate: tuple[str, ...] = ()) -> None:
        """Send commands in one message and wait for every answer."""
        ids = [uuid.uuid4().hex for _ in commands]
        body = {
            "commands": [{**c, "correlationData": i} for c, i in zip(commands, ids, strict=True)]
        }
        info = self.client.publish(CONTROL_TOPIC, json.dumps(body).encode(), qos=1)
        if info.rc != 0:
            raise IdentityError(f"could not send to the broker (paho rc {info.rc})")
        with self._arrived:
            done = self._arrived.wait_for(
                lambda: all(i in self._answers for i in ids), self.timeout_s
            )
            if not done:
                raise IdentityError(
                    f"the broker did not answer {[c['command'] for c in commands]} within "
                    f"{self.timeout_s:.0f} s (is the admin role allowed $CONTROL?)"
                )
            answers = [self._answers.pop(i) for i in ids]
        for command, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and not any(t in str(error).lower() for t in tolerate):
                raise IdentityError(f"broker refused {command['command']}: {error}")

    # -- paho's thread ---------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return  # not an answer of the plugin's shape: not ours
        with self._arrived:
            for answer in responses if isinstance(responses, list) else []:
                if isinstance(answer, dict) and "correlationData" in answer:
                    self._answers[str(answer["correlationData"])] = answer
            self._arrived.notify_all()
