"""Alembic migrations up and down on PostgreSQL and SQLite, and the settings' guards."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text

from cloud.config import CloudSettings
from cloud.store.db import make_engine, migrate, require_schema, session_factory
from shared.errors import ConfigError

TABLES = {
    "devices",
    "samples",
    "labels",
    "dead_letters",
    "model_versions",
    "rollouts",
    "rounds",
    "device_updates",
    "deltas",
    "fleets",
    "ingest_buckets",
    "ingest_members",
    "ingest_suspects",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    migrate(url)
    assert _tables(url) == TABLES
    migrate(url, "base", downgrade=True)
    assert _tables(url) == set()
    migrate(url)
    assert _tables(url) == TABLES


def test_upgrade_downgrade_postgres(pg_url):
    """On PostgreSQL the schema goes up to head, all the way down, and up again."""
    _round_trip(pg_url)


def test_upgrade_downgrade_sqlite(tmp_path):
    """On SQLite the schema goes up to head, all the way down, and up again."""
    _round_trip(f"sqlite:///{tmp_path / 'e.db'}")


def test_production_refuses_unsafe_defaults(monkeypatch):
    """Production mode names every unsafe default instead of starting."""
    monkeypatch.setenv("EDGELOOP_MODE", "production")
    with pytest.raises(ConfigError) as err:
        CloudSettings()
    for part in ("DATABASE_URL", "S3_SECRET_KEY", "MQTT_TLS", "MLFLOW_TRACKING_URI"):
        assert part in str(err.value)


def test_production_accepts_safe_settings(monkeypatch):
    """Production mode starts when every setting is real."""
    for key, value in {
        "MODE": "production",
        "DATABASE_URL": "postgresql://db/edgeloop",
        "STORE": "s3",
        "S3_SECRET_KEY": "a-long-real-secret",
        "S3_SECURE": "true",
        "MQTT_TLS": "true",
        "MQTT_USERNAME": "ingest",
        "MQTT_PASSWORD": "another-real-secret",
        "MQTT_SYSTEM_CA": "true",  # a publicly signed broker: no CA file to name
        "MLFLOW_TRACKING_URI": "https://mlflow.example",
        # How PostgreSQL, Redis and MLflow are reached (tests/test_client_settings.py).
        "DATABASE_SSLMODE": "verify-full",
        "REDIS_URL": "rediss://redis.example:6380/0",
        "REDIS_PASSWORD": "a-real-redis-secret",
        "MLFLOW_TRACKING_USERNAME": "edgeloop-worker",
        "MLFLOW_TRACKING_PASSWORD": "a-real-mlflow-secret",
    }.items():
        monkeypatch.setenv(f"EDGELOOP_{key}", value)
    assert CloudSettings().mode == "production"


def test_edge_production_refuses_plain_mqtt(monkeypatch):
    """An edge agent in production mode will not talk MQTT without TLS and a password."""
    from edge_agent.config import EdgeSettings

    monkeypatch.setenv("EDGELOOP_EDGE_MODE", "production")
    with pytest.raises(ConfigError, match="MQTT_TLS"):
        EdgeSettings()


def test_sessions_do_not_migrate_and_commands_say_what_to_run(tmp_path):
    """Opening sessions leaves a new database empty; require_schema names the command
    that brings it up to date, and passes once it ran."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    session_factory(url)().close()
    assert _tables(url) == set()
    with pytest.raises(ConfigError, match="edgeloop cloud migrate"):
        require_schema(url)

    migrate(url)

    require_schema(url)


def test_trigger_baselines_move_out_of_the_gate_report_and_back(tmp_path):
    """Revision 0005 moves a version's trigger baselines from ``gates`` to ``baselines``
    (the gate report keeps only gates); its downgrade puts them back."""
    url = f"sqlite:///{tmp_path / 'b.db'}"
    migrate(url, "20261129_0004")
    engine = make_engine(url)
    gates = {"passed": True, "failed": [], "fleet_anomaly_rate": 0.25, "label_watermark": 7}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (name, version, profile, sha256, object_key, "
                "class_names, gates, created_at) VALUES ('m', 'v1', 'cpu-fp32', 's', 'k', "
                "'[]', :gates, '2026-11-30 00:00:00')"
            ),
            {"gates": json.dumps(gates)},
        )

    migrate(url)

    with engine.connect() as conn:
        row = conn.execute(text("SELECT gates, baselines FROM model_versions")).one()
    assert json.loads(row.gates) == {"passed": True, "failed": []}
    assert json.loads(row.baselines) == {"fleet_anomaly_rate": 0.25, "label_watermark": 7}
    migrate(url, "20261129_0004", downgrade=True)
    with engine.connect() as conn:
        assert json.loads(conn.execute(text("SELECT gates FROM model_versions")).scalar()) == gates
    engine.dispose()
