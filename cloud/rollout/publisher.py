"""Sends a registered package to the devices that should run it (whole package, for now)."""

from __future__ import annotations

import base64
import logging
import uuid
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cloud.store.db import Device, DeviceUpdate
from shared.messages import UpdateNotice
from shared.package import ModelPackage
from shared.topics import topic

log = logging.getLogger(__name__)
UPDATE_TTL = timedelta(days=7)


class Publisher:
    def __init__(self, *, host: str, port: int) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgeloop-publisher-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def roll_out(
        self, *, sessions: sessionmaker, fleet: str, package: bytes, rollout_id: int | None = None
    ) -> list[str]:
        """Notify every device of ``fleet`` on the package's profile that does not run it.

        Returns the device ids notified; each gets a DeviceUpdate row in state ``sent``.
        """
        pkg = ModelPackage(package)
        m = pkg.manifest
        encoded = base64.b64encode(package).decode("ascii")
        sent = []
        with sessions() as session:
            devices = session.scalars(
                select(Device).where(Device.fleet == fleet, Device.profile == m.profile)
            ).all()
            for device in devices:
                if device.model_version == m.version:
                    continue
                notice = UpdateNotice(
                    fleet=fleet,
                    device_id=device.id,
                    target_version=m.version,
                    base_version=device.model_version,
                    sha256=pkg.sha256,
                    package=encoded,
                    expires_at=datetime.now(UTC) + UPDATE_TTL,
                )
                info = self.client.publish(
                    topic(fleet, device.id, "updates"), notice.encode(), qos=1
                )
                info.wait_for_publish(timeout=30)
                row = session.scalars(
                    select(DeviceUpdate).where(
                        DeviceUpdate.device_id == device.id,
                        DeviceUpdate.target_version == m.version,
                    )
                ).first()
                if row is None:
                    session.add(
                        DeviceUpdate(
                            device_id=device.id,
                            target_version=m.version,
                            base_version=device.model_version,
                            state="sent",
                            rollout_id=rollout_id,
                        )
                    )
                sent.append(device.id)
            session.commit()
        log.info("sent %s to %d device(s) of %s", m.version, len(sent), fleet)
        return sent
