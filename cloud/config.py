"""Settings of a cloud process (ingest, worker, beat, CLI), from EDGELOOP_* env vars or `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError
from shared.mqtt import MqttOptions

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
    # -- MQTT transport security (issue 15): applied to every MQTT client by shared.mqtt --
    # Each cloud process connects with its own broker role (ingest, rollout: see
    # docs/security-broker.md); the CA file verifies a broker with a private CA.
    mqtt_ca_file: Path | None = None
    mqtt_system_ca: bool = False  # the broker's certificate is publicly signed
    mqtt_cert_file: Path | None = None  # a client certificate, where the broker asks one
    mqtt_key_file: Path | None = None
    mqtt_timeout_s: float = 10.0  # TCP + TLS connect
    mqtt_keepalive_s: int = 30
    # The broker's dynamic-security admin: `edgeloop fleet enroll` and `revoke` only.
    mqtt_admin_username: str | None = None
    mqtt_admin_password: str | None = None

    def mqtt_options(self, *, admin: bool = False) -> MqttOptions:
        """How this process reaches the broker (``admin``: as the credential admin)."""
        return MqttOptions.from_settings(
            self,
            username=self.mqtt_admin_username if admin else self.mqtt_username,
            password=self.mqtt_admin_password if admin else self.mqtt_password,
            keepalive_s=self.mqtt_keepalive_s,
        )

    # -- end MQTT transport security --

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
    # Hours between the starts of two rounds of a fleet and profile, whatever fires (label
    # floods or claimed anomalies cannot start rounds back to back), and the devices that
    # must report before the fleet's median anomaly rate counts as drift.
    trigger_min_interval_h: float = 1.0
    trigger_drift_min_devices: int = 3
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
    # --- Rounds through outages (issue 15) ---
    # How long a round's stage waits out PostgreSQL, the object store, Redis or MLflow being
    # unreachable (retried with backoff, cloud.store.outages) before it fails the round.
    round_outage_patience_s: float = 300.0
    # --- Round memory (issue 15) ---
    # The most new labelled windows one round loads (cloud.learn.data.labelled_uploads):
    # past it, a class-balanced sample, reservoir by reservoir, drawn with the round's seed.
    round_max_windows: int = 20_000
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
    # Departed ingests (docs/ingest-sessions.md): each ingest holds an MQTT v5 session that
    # the broker keeps this long after its connection drops. A restart within it under the
    # same replica slot (the client id) gets what the broker queued meanwhile; past it, the
    # session and its share of the group's messages are gone and devices' re-sends bring
    # them. 4294967295 never expires (the v3.1.1 persistent session of before).
    ingest_session_expiry_s: Annotated[int, Field(ge=0, le=4294967295)] = 30
    ingest_slot: Annotated[int, Field(ge=0, le=9999)] = 0  # the replica's slot: its client id
    # How often each ingest records itself in PostgreSQL (`fleet status`); a slot silent
    # for three of these is free for another process.
    ingest_heartbeat_s: Annotated[float, Field(gt=0)] = 5.0
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
    # Retention (docs/retention.md): what `edgeloop cloud gc` and its daily beat task
    # delete. Ages in days, 0 keeps forever. A fleet overrides any of these in its row's
    # settings under the same name, e.g. {"retention_samples_days": 90}.
    retention_samples_days: float = 365.0  # labelled uploads (unless a kept model names them)
    retention_unlabelled_days: float = 30.0  # uploads no label ever reached
    retention_dead_letters_days: float = 30.0  # dead letters and their raw payloads
    retention_deltas_days: float = 30.0  # cached deltas (remade on demand)
    retention_versions_keep: int = 5  # newest model versions kept per profile, protected or not
    retention_mlflow_runs_days: float = 180.0  # MLflow runs no kept version or rollout needs
    retention_batch: int = 500  # rows deleted per transaction
    retention_gc_hour_utc: int = 3  # beat: the daily gc starts at this hour (UTC)

    # --- How every client of ours connects: TLS, CA files, credentials, timeouts -------
    # (docs/security-clients.md; cloud/store/connect.py and cloud/tracking/connect.py apply
    # them.) PostgreSQL, as libpq parameters: they override the same ones in the URL.
    database_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = None
    database_sslrootcert: Path | None = None  # the CA that signed the server's certificate
    database_sslcert: Path | None = None  # a client certificate, where the server asks one
    database_sslkey: Path | None = None
    database_connect_timeout_s: int = 10
    # Redis (broker, results, round locks, webhook delivery ids): rediss:// in the URL for
    # TLS; credentials here override those in the URL (Redis 6 ACL user, or only a password).
    redis_ca_file: Path | None = None
    redis_certfile: Path | None = None  # a client certificate, where the server asks one
    redis_keyfile: Path | None = None
    redis_username: str | None = None
    redis_password: str | None = None
    redis_connect_timeout_s: float = 5.0
    redis_socket_timeout_s: float = 30.0
    # S3: the CA of a private MinIO (s3_secure on), its region (saves a lookup), timeouts.
    s3_ca_file: Path | None = None
    s3_region: str | None = None
    s3_connect_timeout_s: float = 3.0
    s3_read_timeout_s: float = 20.0
    # MLflow tracking server: basic-auth user and password, or a bearer token; the CA of its
    # TLS certificate; seconds before a request gives up.
    mlflow_tracking_username: str | None = None
    mlflow_tracking_password: str | None = None
    mlflow_tracking_token: str | None = None
    mlflow_ca_file: Path | None = None
    mlflow_request_timeout_s: int = 120
    mlflow_request_max_retries: int | None = None  # MLflow's default: 7, with backoff
    # --- end of client connection settings ----------------------------------------------

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
        problems += self.mqtt_options().problems(production=True, prefix="EDGELOOP_")
        if self.mqtt_password in PLACEHOLDER_SECRETS:
            problems.append("EDGELOOP_MQTT_PASSWORD is a placeholder")
        problems += self._unsafe_clients()
        if problems:
            raise ConfigError("unsafe production settings: " + "; ".join(problems))
        return self

    def _unsafe_clients(self) -> list[str]:
        """What production refuses in how PostgreSQL, Redis and MLflow are reached."""
        problems = []
        db = urlsplit(self.database_url)
        sslmode = self.database_sslmode or parse_qs(db.query).get("sslmode", [None])[-1]
        if sslmode not in ("verify-full", "verify-ca"):
            problems.append(
                "EDGELOOP_DATABASE_SSLMODE must be verify-full (or verify-ca): without it "
                "PostgreSQL is reached without checking whose certificate it is"
            )
        redis_url = urlsplit(self.redis_url)
        if redis_url.scheme != "rediss":
            problems.append("EDGELOOP_REDIS_URL must be rediss:// (Redis over TLS)")
        password = self.redis_password or redis_url.password
        if not password or password in PLACEHOLDER_SECRETS:
            problems.append("EDGELOOP_REDIS_PASSWORD is missing or a placeholder")
        db_password = db.password
        if db_password is not None and db_password in PLACEHOLDER_SECRETS:
            problems.append("the password in EDGELOOP_DATABASE_URL is a placeholder")
        if self.mqtt_admin_username and (
            not self.mqtt_admin_password or self.mqtt_admin_password in PLACEHOLDER_SECRETS
        ):
            problems.append("EDGELOOP_MQTT_ADMIN_PASSWORD is missing or a placeholder")
        if not self.mlflow_tracking_uri.startswith("https://"):
            problems.append("EDGELOOP_MLFLOW_TRACKING_URI must be an https:// MLflow server")
        has_password = bool(self.mlflow_tracking_username and self.mlflow_tracking_password)
        if not (has_password or self.mlflow_tracking_token):
            problems.append(
                "EDGELOOP_MLFLOW_TRACKING_USERNAME and _PASSWORD (or _TOKEN) must be set: "
                "the tracking server runs with authentication"
            )
        elif has_password and self.mlflow_tracking_password in PLACEHOLDER_SECRETS:
            problems.append("EDGELOOP_MLFLOW_TRACKING_PASSWORD is a placeholder")
        return problems

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
