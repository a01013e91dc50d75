"""Settings of one edge agent, from EDGELOOP_EDGE_* env vars, `.env` or CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError
from shared.mqtt import MqttOptions


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_EDGE_", env_file=".env", extra="ignore")

    mode: Literal["embedded", "test", "production"] = "embedded"
    fleet: str = "default"
    device_id: str = "device-1"
    profile: str = "cpu-fp32"
    state_dir: Path = Path(".edgeloop/edge")

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_tls: bool = False
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    keepalive_s: int = 30
    # -- MQTT transport security (issue 15): the credentials `edgeloop fleet enroll` wrote
    # (mqtt.env in the enrollment folder) and the fleet's broker CA --
    mqtt_ca_file: Path | None = None
    mqtt_system_ca: bool = False  # the broker's certificate is publicly signed
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_timeout_s: float = Field(10.0, gt=0)  # TCP + TLS connect

    def mqtt_options(self) -> MqttOptions:
        return MqttOptions.from_settings(
            self,
            username=self.mqtt_username,
            password=self.mqtt_password,
            keepalive_s=self.keepalive_s,
        )

    # -- end MQTT transport security --

    threads: int = Field(1, ge=1, le=64)
    # Which score a sample carries to the cloud (see edge_agent.scoring); energy when the
    # package has no calibration for the one named.
    anomaly_score: Literal["energy", "max_softmax", "distance"] = "distance"
    uncertain_below: float = Field(0.7, gt=0, le=1)  # max-softmax under this: uncertain
    ood_energy_above: float | None = None  # energy over this: out of distribution
    normal_class: str = "normal"
    upload_bytes_per_hour: int = Field(50_000_000, ge=0)
    diversity_distance: float = Field(0.5, ge=0)  # see selection.Selector
    buffer_max_messages: int = Field(100_000, ge=10)
    # Selected windows become durable in batches: at least every commit_interval_s, or as
    # soon as commit_batch are queued (see EdgeAgent).
    commit_interval_s: float = Field(0.05, gt=0, le=5)
    commit_batch: int = Field(64, ge=1)
    resend_after_s: float = Field(10.0, gt=0)
    heartbeat_s: float = Field(30.0, gt=0)
    # Update downloads (edge_agent.transfer): chunks asked for at a time, seconds without a
    # chunk before asking again, and seconds online without one before the download is
    # reported transfer_failed (what arrived stays on disk; the next offer resumes from the
    # first missing chunk). Offline time does not count: the download waits for the link.
    transfer_window: int = Field(8, ge=1, le=64)
    transfer_retry_s: float = Field(3.0, gt=0)
    transfer_stall_s: float = Field(120.0, gt=0)
    # Whether this device can reach object storage: then a presigned URL in an offer is
    # fetched first (HTTP range from the first missing chunk), and MQTT fills the rest.
    # Offers are not signed, so only a URL on one of fetch_url_hosts ("host:port", comma
    # separated; none by default) is fetched: any other is ignored, never requested.
    # url_timeout_s: seconds without a whole chunk from the URL; url_deadline_s: the most
    # the URL may take in all. Past either, the rest comes over MQTT.
    fetch_urls: bool = False
    # Whether this agent applies delta updates (heartbeats then list "delta" and the cloud
    # signs it a delta from the model it runs, when smaller than the package). Off, it
    # takes whole packages, as agents before delta updates do.
    deltas: bool = True
    fetch_url_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    url_timeout_s: float = Field(20.0, gt=0)
    url_deadline_s: float = Field(600.0, gt=0)

    @field_validator("fetch_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @property
    def url_hosts(self) -> frozenset[str]:
        """The object-storage hosts ("host:port", lower case) a URL may name."""
        return frozenset(h.lower() for h in self.fetch_url_hosts)

    @property
    def trust_dir(self) -> Path:
        """Where the fleet's root and the newest verified release metadata live."""
        return self.state_dir / "trust"

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> EdgeSettings:
        # Production refuses TLS off, no CA and no credentials; any mode refuses TLS without
        # a username (the broker would refuse it: the setting is missing).
        problems = self.mqtt_options().problems(
            production=self.mode == "production", prefix="EDGELOOP_EDGE_"
        )
        if problems:
            raise ConfigError("unsafe MQTT settings: " + "; ".join(problems))
        return self
