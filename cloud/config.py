"""Settings of a cloud process (ingest, worker, beat, CLI), from EDGELOOP_* env vars or `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "minioadmin", "edgeloop", "secret", "password"})


class CloudSettings(BaseSettings):
    """Embedded defaults run on one machine; ``mode=production`` refuses unsafe ones."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", env_file=".env", extra="ignore")

    mode: Literal["embedded", "test", "production"] = "embedded"
    home: Path = Path(".edgeloop")  # where embedded state lives

    database_url: str = ""  # default: SQLite file under home
    # Object store: "local" (a directory under home) or "s3" (MinIO / any S3 API).
    store: Literal["local", "s3"] = "local"
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "edgeloop"
    s3_secret_key: str = "edgeloop"
    s3_bucket: str = "edgeloop"
    s3_secure: bool = False

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_tls: bool = False
    mqtt_username: str | None = None
    mqtt_password: str | None = None

    redis_url: str = "redis://127.0.0.1:6379/0"
    celery_queue: str = "celery"  # where rounds and trigger checks are queued
    # Seconds before Redis hands an unacknowledged round to another worker: longer than
    # the longest round, or a slow round is delivered twice (the copy finds the round
    # lock held, retries until the first is done, then returns its recorded result).
    celery_visibility_timeout_s: int = 4 * 3600
    # The per-fleet round lock lives this long unless its holder renews it (every third).
    round_lock_ttl_s: int = 60
    # Learning-round triggers, checked by Celery beat every trigger_interval_s (see
    # cloud.triggers.TriggerPolicy for what each rule means).
    trigger_interval_s: float = 300.0
    trigger_min_new_labels: int = 50
    trigger_anomaly_rate_jump: float = 0.2
    trigger_max_age_h: float | None = 24 * 7
    # What a Celery round trains with (cloud.learning.RoundConfig): fine-tuning epochs,
    # windows per class in the replay reservoir, the compression pipeline's distillation
    # epochs, and the teacher's confidence bar for pseudo-labels (unset: none).
    round_epochs: int = 25
    round_replay_per_class: int = 120
    round_distill_epochs: int = 30
    # Compressing profiles: ship a package kept close to the parent's (small delta) when it
    # is within this many points of the unconstrained one on validation (cloud.learn.close).
    round_delta_friendly: bool = True
    round_close_tolerance_pts: float = 1.0
    round_pseudo_label_min_confidence: float | None = None
    # A round's gates, set to the product's goals: each new class's recall on held-out
    # uploads, the old classes' macro-F1 drop and the detection-rate drop on the golden set
    # (points). Per fleet: EDGELOOP_ROUND_GATES_BY_FLEET='{"plant-a": {"min_new_recall": 0.8}}'.
    round_min_new_recall: float = 0.9
    round_max_old_f1_drop_pts: float = 1.0
    round_max_detection_drop_pts: float = 3.0
    round_gates_by_fleet: dict[str, dict[str, float]] = {}
    mlflow_tracking_uri: str = ""  # default: sqlite store under home
    # -- hostile input at ingest (cloud.ingest.limits; docs/security-ingest.md) -------------
    # A device's upload quota: its fleet's `upload_bytes_per_hour` / `upload_messages_per_hour`
    # (the fleet row's settings; these are the defaults, the edge's byte budget among them)
    # times the factor, which leaves room to catch up after days offline. The bucket holds
    # burst_s worth of quota. Past it, messages get a `retry` ack, never `rejected`.
    ingest_upload_bytes_per_hour: int = 50_000_000
    ingest_upload_messages_per_hour: int = 10_000
    ingest_quota_factor: float = 4.0
    ingest_quota_burst_s: float = 3600.0
    # Dead letters: the payload prefix kept, and the rows a device may add per hour (past
    # it they are counted on its newest row, not stored).
    ingest_dead_letter_max_bytes: int = 64 << 10
    ingest_dead_letters_per_device_hour: int = 100
    # Rollouts (docs/rollout.md says what each judgement means). A fleet overrides any of
    # these in its row's settings under the same name, e.g. {"rollout_dwell_heartbeats": 5}.
    rollout_canary_min_devices: int = 5  # the canary cohort: the larger of this many devices
    rollout_canary_share: float = 0.05  # … and this share of the profile's devices
    rollout_wave_growth: float = 2.0  # wave k after the canaries: canaries × growth^k devices
    rollout_dwell_heartbeats: int = 3  # heartbeats from each device on the target, then judge
    rollout_alpha: float = 0.01  # significance of the one-sided two-proportion anomaly test
    rollout_min_effect: float = 0.05  # … and the least rise of the anomaly rate that aborts
    rollout_max_accuracy_drop_pts: float = 5.0  # labelled accuracy, target vs previous
    rollout_min_labels: int = 30  # labels each side needs before accuracy is judged
    rollout_wave_timeout_s: float = 1800.0  # a device silent this long in its wave has failed
    rollout_presigned_urls: bool = False  # offers carry a presigned S3 URL of the package
    rollout_resend_s: float = 60.0  # offer again to a device that has not answered
    # The MQTT shared-subscription group the rollout transports split chunk requests in:
    # every member must read the same object store ("": each transport hears every request).
    rollout_shared_group: str = "rollout"
    rollout_tick_s: float = 5.0  # beat: advance every active rollout
    rollout_reconcile_s: float = 60.0  # beat: compare champions with rollout records
    # The online TUF keys (releases, snapshot, timestamp) the rollout worker signs with.
    tuf_keys_dir: Path | None = None  # default: home/keys
    tuf_timestamp_check_s: float = 600.0  # beat: re-sign timestamps expiring within …
    tuf_timestamp_refresh_within_h: float = 12.0  # … this many hours

    @field_validator("round_gates_by_fleet")
    @classmethod
    def _known_gates(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        known = {"min_new_recall", "max_old_f1_drop_pts", "max_detection_drop_pts"}
        for fleet, gates in value.items():
            unknown = set(gates) - known
            if unknown:
                raise ValueError(
                    f"round_gates_by_fleet[{fleet!r}] names {sorted(unknown)}; "
                    f"the gates are {sorted(known)}"
                )
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> CloudSettings:
        if self.mode != "production":
            return self
        problems = []
        if not self.database_url or self.database_url.startswith("sqlite"):
            problems.append("EDGELOOP_DATABASE_URL must point at PostgreSQL, not SQLite")
        if self.store != "s3":
            problems.append("EDGELOOP_STORE must be s3")
        if self.s3_secret_key in PLACEHOLDER_SECRETS:
            problems.append("EDGELOOP_S3_SECRET_KEY is a placeholder")
        if not self.s3_secure:
            problems.append("EDGELOOP_S3_SECURE must be true (TLS)")
        if not self.mqtt_tls:
            problems.append("EDGELOOP_MQTT_TLS must be true")
        if not self.mqtt_password or self.mqtt_password in PLACEHOLDER_SECRETS:
            problems.append("EDGELOOP_MQTT_PASSWORD is missing or a placeholder")
        if not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            problems.append("EDGELOOP_MLFLOW_TRACKING_URI must be an MLflow server")
        if problems:
            raise ConfigError("unsafe production settings: " + "; ".join(problems))
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'edgeloop.db').resolve()}"

    @property
    def resolved_tuf_keys_dir(self) -> Path:
        return (self.tuf_keys_dir or self.home / "keys").resolve()

    @property
    def mlflow_artifact_location(self) -> str | None:
        """With the embedded sqlite store, artifacts live under home (None: the server's)."""
        return None if self.mlflow_tracking_uri else (self.home / "mlartifacts").resolve().as_uri()

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"


@lru_cache
def get_settings() -> CloudSettings:
    return CloudSettings()
