"""The production Redis and PostgreSQL (deploy/redis/, deploy/postgres/, run by
`scripts/services up --production redis postgres` on spare ports): TLS only, and only with
their passwords."""

from __future__ import annotations

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .production import ProductionBroker, spare_port


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    running = ProductionBroker(
        tmp_path_factory.mktemp("prod-services"),
        spare_port(),
        redis_port=spare_port(),
        postgres_port=spare_port(),
    ).start("redis", "postgres")
    yield running
    running.stop()


def test_redis_answers_over_tls_with_its_password_only(services):
    """TLS verified against the fleet CA with the password works; without the password,
    with a wrong one, or without TLS, nothing is read."""

    def client(**kw) -> redis.Redis:
        # No retries: each refusal is seen once (redis-py retries a failed call by default).
        return redis.Redis(
            host="localhost", port=services.redis_port, socket_timeout=2,
            retry=Retry(NoBackoff(), 0), **kw
        )  # fmt: skip

    tls = {"ssl": True, "ssl_ca_certs": str(services.ca_file)}
    good = client(password=services.passwords["redis"], **tls)
    good.set("probe", b"v")
    assert good.get("probe") == b"v"
    with pytest.raises(redis.AuthenticationError):
        client(**tls).get("probe")
    with pytest.raises(redis.AuthenticationError):
        client(password="not-it", **tls).get("probe")
    with pytest.raises(redis.ConnectionError):
        client(password=services.passwords["redis"]).get("probe")


def test_postgres_answers_over_verified_tls_with_its_password_only(services):
    """verify-full against the fleet CA with the password works (and the session is TLS);
    without TLS, or with a wrong password, the server refuses."""

    def dsn(**kw: str) -> str:
        base = {"host": "localhost", "port": str(services.postgres_port), "user": "edgeloop",
                "dbname": "edgeloop", "password": services.passwords["postgres"],
                "sslmode": "verify-full", "sslrootcert": str(services.ca_file),
                "connect_timeout": "5"}  # fmt: skip
        return " ".join(f"{k}={v}" for k, v in {**base, **kw}.items())

    with psycopg.connect(dsn()) as conn:
        ssl_on, version = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert ssl_on and version in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(dsn(sslmode="disable"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(password="not-it"))
