"""Alembic migrations up and down on PostgreSQL and SQLite, and the settings' guards."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from cloud.config import CloudSettings
from cloud.db import make_engine, migrate
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
        "MQTT_PASSWORD": "another-real-secret",
        "MLFLOW_TRACKING_URI": "https://mlflow.example",
    }.items():
        monkeypatch.setenv(f"EDGELOOP_{key}", value)
    assert CloudSettings().mode == "production"


def test_edge_production_refuses_plain_mqtt(monkeypatch):
    """An edge agent in production mode will not talk MQTT without TLS and a password."""
    from edge_agent.config import EdgeSettings

    monkeypatch.setenv("EDGELOOP_EDGE_MODE", "production")
    with pytest.raises(ConfigError, match="MQTT_TLS"):
        EdgeSettings()
