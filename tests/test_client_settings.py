"""Production mode refuses clients that would talk without TLS, without checking whose
certificate answers, or without credentials; the settings become each client's options."""

from __future__ import annotations

import ssl

import pytest

from cloud.config import CloudSettings
from shared.errors import ConfigError

# Every setting production asks for, each set to something safe.
SAFE = {
    "mode": "production",
    "database_url": "postgresql://edgeloop@db.plant.example/edgeloop",
    "database_sslmode": "verify-full",
    "store": "s3",
    "s3_secret_key": "s3-secret-from-a-vault",
    "s3_secure": True,
    "mqtt_tls": True,
    "mqtt_username": "ingest",
    "mqtt_password": "mqtt-password-from-a-vault",
    "mqtt_system_ca": True,  # a publicly signed broker: no CA file to name
    "redis_url": "rediss://redis.plant.example:6380/0",
    "redis_password": "redis-password-from-a-vault",
    "mlflow_tracking_uri": "https://mlflow.plant.example",
    "mlflow_tracking_username": "edgeloop-worker",
    "mlflow_tracking_password": "mlflow-password-from-a-vault",
}


def settings(**overrides: object) -> CloudSettings:
    return CloudSettings(_env_file=None, **{**SAFE, **overrides})  # type: ignore[arg-type]


def test_safe_production_settings_are_accepted():
    """The baseline the refusals below depart from is itself accepted."""
    assert settings().mode == "production"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"database_sslmode": None}, "EDGELOOP_DATABASE_SSLMODE must be verify-full"),
        ({"database_sslmode": "require"}, "EDGELOOP_DATABASE_SSLMODE must be verify-full"),
        ({"database_sslmode": "prefer"}, "EDGELOOP_DATABASE_SSLMODE must be verify-full"),
        ({"redis_url": "redis://redis.plant.example:6379/0"}, "EDGELOOP_REDIS_URL must be rediss://"),
        ({"redis_password": None}, "EDGELOOP_REDIS_PASSWORD is missing or a placeholder"),
        ({"redis_password": "changeme"}, "EDGELOOP_REDIS_PASSWORD is missing or a placeholder"),
        ({"s3_secure": False}, "EDGELOOP_S3_SECURE must be true"),
        ({"s3_secret_key": "minioadmin"}, "EDGELOOP_S3_SECRET_KEY is a placeholder"),
        ({"mlflow_tracking_uri": "http://mlflow.plant.example"}, "must be an https:// MLflow"),
        ({"mlflow_tracking_uri": ""}, "must be an https:// MLflow"),
        ({"mlflow_tracking_password": None}, "EDGELOOP_MLFLOW_TRACKING_USERNAME and _PASSWORD"),
        ({"mlflow_tracking_username": None}, "EDGELOOP_MLFLOW_TRACKING_USERNAME and _PASSWORD"),
        ({"mlflow_tracking_password": "password"}, "MLFLOW_TRACKING_PASSWORD is a placeholder"),
        ({"mqtt_tls": False}, "EDGELOOP_MQTT_TLS must be true"),
        ({"database_url": "sqlite:///x.db"}, "must point at PostgreSQL"),
        ({"database_url": "postgresql://u:changeme@db/e"}, "DATABASE_URL is a placeholder"),
        ({"mqtt_admin_username": "admin", "mqtt_admin_password": "changeme"}, "ADMIN_PASSWORD is"),
        ({"mqtt_admin_username": "admin"}, "EDGELOOP_MQTT_ADMIN_PASSWORD is missing"),
    ],
)  # fmt: skip
def test_production_refuses(overrides, message):
    """Each unsafe client setting is refused in production, by name, saying what to set."""
    with pytest.raises(ConfigError, match="unsafe production settings") as caught:
        settings(**overrides)
    assert message in str(caught.value)


def test_production_takes_tls_and_credentials_from_the_urls_too():
    """sslmode in the database URL and a password in the Redis URL count as set; a bearer
    token stands in for an MLflow user and password."""
    s = settings(
        database_url="postgresql://edgeloop@db.plant.example/edgeloop?sslmode=verify-ca",
        database_sslmode=None,
        redis_url="rediss://:redis-password-in-url@redis.plant.example:6380/0",
        redis_password=None,
        mlflow_tracking_username=None,
        mlflow_tracking_password=None,
        mlflow_tracking_token="token-from-the-identity-provider",
    )
    assert s.mode == "production"


def test_embedded_mode_refuses_nothing():
    """Outside production the same settings are only defaults (one machine, plain ports)."""
    s = CloudSettings(_env_file=None, redis_url="redis://127.0.0.1:6379/0")
    assert s.mode == "embedded" and s.database_sslmode is None


def test_settings_become_client_options(tmp_path):
    """PostgreSQL's libpq parameters, Redis's URL (credentials put in) and TLS options and
    Celery's broker and backend options come from the same settings."""
    from cloud.store.connect import celery_connection, pg_connect_args, redis_tls, redis_url

    ca = tmp_path / "ca.pem"
    s = CloudSettings(
        _env_file=None,
        database_sslmode="verify-full",
        database_sslrootcert=ca,
        database_connect_timeout_s=4,
        redis_url="rediss://cache.example:6380/2",
        redis_username="worker",
        redis_password="p@ss/word",
        redis_ca_file=ca,
    )
    assert pg_connect_args(s) == {
        "connect_timeout": 4,
        "sslmode": "verify-full",
        "sslrootcert": str(ca),
    }
    assert redis_url(s) == "rediss://worker:p%40ss%2Fword@cache.example:6380/2"
    tls = redis_tls(s)
    assert tls is not None
    assert tls["ssl_ca_certs"] == str(ca) and tls["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    conf = celery_connection(s)
    assert conf["broker_url"] == conf["result_backend"] == redis_url(s)
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == tls


def test_a_ca_file_for_plain_redis_is_refused(tmp_path):
    """A Redis CA file with a redis:// URL would silently not be used: a ConfigError."""
    from cloud.store.connect import redis_client

    s = CloudSettings(_env_file=None, redis_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="use rediss://"):
        redis_client(s)
