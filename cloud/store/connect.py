"""How our PostgreSQL and Redis clients connect: TLS, CA files, credentials and timeouts
from the settings (EDGELOOP_DATABASE_*, EDGELOOP_REDIS_*), in one place, so every client
gets the same ones. (S3: cloud.store.objects.open_store; MLflow: cloud.tracking.connect.)"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from cloud.config import CloudSettings
from shared.errors import ConfigError

if TYPE_CHECKING:
    import redis


def pg_connect_args(settings: CloudSettings) -> dict[str, Any]:
    """libpq parameters for psycopg (``create_engine(connect_args=…)``,
    ``psycopg.connect(**…)``); each one set overrides the same one in the URL."""
    args: dict[str, Any] = {"connect_timeout": settings.database_connect_timeout_s}
    optional = {
        "sslmode": settings.database_sslmode,
        "sslrootcert": settings.database_sslrootcert,
        "sslcert": settings.database_sslcert,
        "sslkey": settings.database_sslkey,
    }
    args.update({k: str(v) for k, v in optional.items() if v is not None})
    return args


def redis_url(settings: CloudSettings) -> str:
    """EDGELOOP_REDIS_URL with EDGELOOP_REDIS_USERNAME / _PASSWORD put in (Celery's broker
    and result backend read credentials only from the URL)."""
    parts = urlsplit(settings.redis_url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"EDGELOOP_REDIS_URL {settings.redis_url!r} is no redis:// or rediss:// URL"
        )
    if settings.redis_username is None and settings.redis_password is None:
        return settings.redis_url
    user = settings.redis_username if settings.redis_username is not None else parts.username
    password = settings.redis_password if settings.redis_password is not None else parts.password
    auth = quote(user or "", safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    host = parts.hostname or "127.0.0.1"
    netloc = f"{auth}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_tls(settings: CloudSettings) -> dict[str, Any] | None:
    """The TLS options of a rediss:// URL (certificate and host name always checked);
    None for redis://. A CA or client certificate set for a plain URL is a ConfigError: it
    would silently not be used."""
    if urlsplit(settings.redis_url).scheme != "rediss":
        if settings.redis_ca_file or settings.redis_certfile:
            raise ConfigError(
                "EDGELOOP_REDIS_CA_FILE / _CERTFILE are set but EDGELOOP_REDIS_URL is plain "
                "redis://: use rediss:// for TLS"
            )
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.redis_ca_file:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    if settings.redis_certfile:
        options["ssl_certfile"] = str(settings.redis_certfile)
        options["ssl_keyfile"] = str(settings.redis_keyfile or settings.redis_certfile)
    return options


def redis_client(settings: CloudSettings) -> redis.Redis:
    """A Redis client with the settings' TLS, credentials and timeouts (every Redis client
    of ours comes from here, or from ``celery_connection`` for Celery's own)."""
    import redis

    return redis.Redis.from_url(
        redis_url(settings),
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        **(redis_tls(settings) or {}),
    )


def celery_connection(settings: CloudSettings) -> dict[str, Any]:
    """Celery settings for the same connection: broker and result backend URLs, their TLS
    (``broker_use_ssl``, ``redis_backend_use_ssl``) and timeouts."""
    url = redis_url(settings)
    conf: dict[str, Any] = {
        "broker_url": url,
        "result_backend": url,
        "redis_socket_connect_timeout": settings.redis_connect_timeout_s,
        "redis_socket_timeout": settings.redis_socket_timeout_s,
    }
    tls = redis_tls(settings)
    if tls is not None:
        # kombu and Celery's backend hand these to redis-py's SSLConnection as they are.
        conf["broker_use_ssl"] = tls
        conf["redis_backend_use_ssl"] = tls
    return conf


def broker_transport_options(settings: CloudSettings) -> dict[str, Any]:
    """kombu's Redis transport options: the visibility timeout and socket timeouts."""
    return {
        "visibility_timeout": settings.celery_visibility_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_socket_timeout_s,
    }
