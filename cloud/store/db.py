"""The SQL schema (SQLAlchemy 2) and session helpers; Alembic in migrations/ owns its history.

Nothing here migrates as a side effect: `edgeloop cloud migrate` and each service at its
start call ``migrate`` explicitly; operator commands call ``require_schema`` first."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from cloud.config import CloudSettings, get_settings
from shared.errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
_MIGRATE_LOCK = threading.Lock()


def _now() -> datetime:
    return datetime.now(UTC)


def aware(t: datetime) -> datetime:
    """``t`` with a timezone: SQLite hands back naive datetimes of what was stored as UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    profile: Mapped[str] = mapped_column(String(64), default="cpu-fp32")
    model_version: Mapped[str | None] = mapped_column(String(64))
    last_seen: Mapped[datetime | None]
    online: Mapped[bool] = mapped_column(default=False)
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    # Enrollment (`edgeloop fleet enroll`): where it stands and how operators group it.
    site: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What the agent says of itself in every heartbeat.
    agent_version: Mapped[str | None] = mapped_column(String(64))
    capabilities: Mapped[list[Any]] = mapped_column(default=list)
    # -- Broker identity (issue 15, `edgeloop fleet enroll` / `revoke`): the MQTT username
    # its credentials were issued for and when (never the password), and when it was
    # revoked: ingest refuses a revoked device's messages (cloud.store.records.is_revoked).
    broker_username: Mapped[str | None] = mapped_column(String(140))
    credentials_issued_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # -- end broker identity


class Fleet(Base):
    """A fleet: the classes its devices may label, its rollout settings and the counter of
    its signed releases (the TUF ``releases`` role's version)."""

    __tablename__ = "fleets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    classes: Mapped[list[Any]] = mapped_column(default=list)  # the label allow-list
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # per-fleet overrides
    release: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Sample(Base):
    """One uploaded window; the bytes live in object storage under their content hash."""

    __tablename__ = "samples"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the message id
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    object_key: Mapped[str] = mapped_column(String(200))
    # None: the object is this one window (.npy); else its row in a batch object (N, T, C).
    object_index: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[Any]] = mapped_column()
    captured_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=_now, index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    predicted: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[Any]] = mapped_column(default=list)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("sample_id", "source", name="uq_label_sample_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # device | operator | teacher
    confidence: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class DeadLetter(Base):
    """A message that failed validation: why, and where its raw bytes are kept."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_device_received", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str | None] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)
    topic: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text)
    payload_key: Mapped[str | None] = mapped_column(String(200))
    received_at: Mapped[datetime] = mapped_column(default=_now)
    # -- hostile input (issue 15): the object holds at most a prefix of the payload; its
    # full length and hash are here. Past a device's hourly cap no row or object is
    # written: the newest row counts them by reason ({reason: n}).
    payload_bytes: Mapped[int | None] = mapped_column(Integer)
    payload_sha256: Mapped[str | None] = mapped_column(String(64))
    suppressed: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class IngestBucket(Base):
    """A device's upload token buckets (bytes and messages), shared by every ingest process
    (cloud.ingest.limits says why in PostgreSQL)."""

    __tablename__ = "ingest_buckets"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes_tokens: Mapped[float] = mapped_column(Float)
    message_tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime]


class IngestMember(Base):
    """One ingest process's place in its shared-subscription group, by MQTT client id (the
    broker's unit): the broker keeps no list of a group's members, so each ingest records
    its own (cloud.ingest.members)."""

    __tablename__ = "ingest_members"

    client_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    group: Mapped[str] = mapped_column(String(64))
    fleet: Mapped[str] = mapped_column(String(64))  # '+': every fleet
    slot: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(String(32))  # this process, whatever its host and pid
    session_expiry_s: Mapped[int] = mapped_column(BigInteger)
    heartbeat_s: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime]  # its last heartbeat
    stopped_at: Mapped[datetime | None]  # a clean stop; None while it runs (or after a kill)
    last_batch_at: Mapped[datetime | None]
    stored: Mapped[int] = mapped_column(BigInteger, default=0)  # samples, since it started
    received: Mapped[int] = mapped_column(BigInteger, default=0)  # messages from the broker
    # sha256 of each payload of the batch it is handling now: what it was on when it died.
    inflight: Mapped[list[Any]] = mapped_column(default=list)


class IngestSuspect(Base):
    """A payload that was in hand when an ingest died (cloud.ingest.members): handled alone
    from then on, and ``crashes`` counts the deaths while it was alone. At CRASH_LIMIT it
    is dead-lettered unread, never handled again."""

    __tablename__ = "ingest_suspects"

    payload_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    crashes: Mapped[int] = mapped_column(Integer)
    last_at: Mapped[datetime]


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))  # MLflow registered model name
    version: Mapped[str] = mapped_column(String(64))  # the version devices report
    mlflow_version: Mapped[str | None] = mapped_column(String(32))
    profile: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(200))
    class_names: Mapped[list[Any]] = mapped_column()
    gates: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the round's gate report
    # What the trigger policies compare against: the fleet's anomaly rate when the version
    # was registered and the last label id its round learnt from.
    baselines: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    # Retention (cloud.retention): set when garbage collection removed the version's
    # package, checkpoint and MLflow model version; the row stays (numbers never reused).
    expired_at: Mapped[datetime | None]


class Round(Base):
    """One learning round as Celery runs it: its version is reserved before training, so a
    round redelivered after its worker died finishes under the same version, once."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("fleet", "profile", "version", name="uq_round_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    fleet: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    # The stage running or last run (train, recompress, evaluate, register), then done or
    # failed.
    state: Mapped[str] = mapped_column(String(16), default="train")
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=1)  # deliveries of the round
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the round's answer, once done
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # RoundConfig, fixed at reserve
    # stage → {"attempts": n, "done": bool, "output": {...}, "error": str}
    stages: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)


class Rollout(Base):
    """One move of a profile's ``champion`` alias, carried to the devices in waves."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    profile: Mapped[str] = mapped_column(String(64))
    # pending → wave (sending / dwelling) → done; or paused, aborted (canaries rolled
    # back), superseded (champion moved again).
    state: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    target_version: Mapped[str] = mapped_column(String(64), default="")
    mlflow_version: Mapped[str | None] = mapped_column(String(32))
    trigger: Mapped[str] = mapped_column(String(32), default="alias")  # alias | reconcile | init
    # Who moved the champion alias (cloud.rollout.controller.moved_by); None: no move
    # (devices enrolled since), or a rollout from before this was recorded.
    moved_by: Mapped[str | None] = mapped_column(String(200))
    wave: Mapped[int] = mapped_column(Integer, default=0)  # the wave under way (0: canaries)
    plan: Mapped[list[Any]] = mapped_column(default=list)  # device ids per wave
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the settings it runs with
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the last judgement
    reason: Mapped[str] = mapped_column(Text, default="")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    release: Mapped[int | None] = mapped_column(Integer)  # the last release it signed
    wave_started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class DeviceUpdate(Base):
    """Where one device stands in one rollout: pending, sent, installed, failed, rolled_back."""

    __tablename__ = "device_updates"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_update_rollout_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    target_version: Mapped[str] = mapped_column(String(64))
    base_version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="sent")
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None]
    installed_at: Mapped[datetime | None]
    # The device's heartbeat health before it installed, and the heartbeats counted since.
    before: Mapped[dict[str, Any]] = mapped_column(default=dict)
    beats_after: Mapped[int] = mapped_column(Integer, default=0)
    # The payload offered (a delta from base_version, or the package) until the device
    # reports what it applied (delta, package, or spare: no download), and the offer's
    # bytes; what the device received, and why it refused a delta (it took the package).
    payload: Mapped[str | None] = mapped_column(String(16))
    payload_bytes: Mapped[int | None] = mapped_column(Integer)
    received_bytes: Mapped[int | None] = mapped_column(Integer)
    delta_refused: Mapped[str | None] = mapped_column(Text)


class Delta(Base):
    """A delta the rollout made from one version of a profile's model to another (lineage:
    which deltas each version has, their sizes; device_updates say who received which).
    ``length`` is None when the delta was not smaller than the package (none is offered)."""

    __tablename__ = "deltas"
    __table_args__ = (
        UniqueConstraint("fleet", "profile", "base_sha256", "target_sha256", name="uq_delta_pair"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fleet: Mapped[str] = mapped_column(String(64), index=True)
    profile: Mapped[str] = mapped_column(String(64))
    base_version: Mapped[str] = mapped_column(String(64))
    target_version: Mapped[str] = mapped_column(String(64))
    base_sha256: Mapped[str] = mapped_column(String(64))
    target_sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str | None] = mapped_column(String(64))  # the delta's own (TUF signs it)
    length: Mapped[int | None] = mapped_column(Integer)
    target_length: Mapped[int] = mapped_column(Integer)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=_now)


def make_engine(url: str, settings: CloudSettings | None = None) -> Engine:
    """An engine on ``url``; on PostgreSQL with the settings' TLS, CA, client certificate
    and connect timeout (cloud.store.connect.pg_connect_args; default: this process's)."""
    from cloud.store.connect import pg_connect_args

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    connect_args = {}
    if url.startswith("postgresql"):
        connect_args = pg_connect_args(settings or get_settings())
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:  # WAL: readers never block the ingest
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    return engine


def migrate(url: str, revision: str = "head", *, downgrade: bool = False) -> None:
    """Run Alembic on ``url`` (upgrade to, or downgrade to, ``revision``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Alembic keeps its running context in module globals: one migration at a time per
    # process (a threads-pool Celery worker starts rounds side by side).
    with _MIGRATE_LOCK:
        (command.downgrade if downgrade else command.upgrade)(cfg, revision)


def session_factory(url: str, settings: CloudSettings | None = None) -> sessionmaker:
    """Sessions on ``url``, as it is: migrate first (``migrate``) where the schema may lag."""
    return sessionmaker(make_engine(url, settings), expire_on_commit=False)


def require_schema(url: str) -> None:
    """ConfigError, saying what to run, unless the database at ``url`` is at the newest
    revision."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if current != head:
        raise ConfigError(
            f"the database {url.split('@')[-1]} is at schema revision {current or 'none'}, "
            f"not {head}: run `edgeloop cloud migrate` first"
        )


def new_id() -> str:
    return str(uuid.uuid4())
