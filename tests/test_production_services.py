"""The production Redis (deploy/redis/redis.conf, run by `scripts/services up --production
redis` on a spare port): TLS only, and only with its password."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .production import ProductionBroker, spare_port


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    running = ProductionBroker(
        tmp_path_factory.mktemp("prod-redis"), spare_port(), redis_port=spare_port()
    ).start("redis")
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
