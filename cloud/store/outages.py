"""What the cloud treats as an outage: errors that say PostgreSQL, the object store, Redis
or MLflow cannot be reached right now, never that the work is wrong. Ingest retries a batch
that raises one of ``TRANSIENT`` (nothing is acked meanwhile); a learning round's stage
asks ``is_transient`` and waits the outage out for ``round_outage_patience_s`` before it
fails the round (cloud.learn.runner, cloud.tasks.rounds)."""

from __future__ import annotations

import errno
import socket

from minio.error import S3Error, ServerError
from psycopg import InterfaceError as PgInterfaceError
from psycopg import OperationalError as PgOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from urllib3.exceptions import HTTPError as Urllib3Error

from cloud.store.objects import StorageError

TRANSIENT = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,  # every pooled connection busy or hung: an outage, not the message's fault
    PgOperationalError,  # COPY runs on the driver's connection, unwrapped by SQLAlchemy
    PgInterfaceError,
    StorageError,
    OSError,
)

# The network's side of OSError (a round's stages also meet the file system's: a missing
# file there is a defect, not an outage).
_NETWORK = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
}  # fmt: skip
_OUTAGES = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    PgOperationalError,
    PgInterfaceError,
    Urllib3Error,  # the object store's client, and under requests (MLflow's)
    RedisConnectionError,
    RedisTimeout,
)

# What an S3 server answers while it cannot serve (SeaweedFS re-electing its master after a
# restart answers InternalError "please try again" for seconds).
_S3_BUSY = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def _s3_busy(e: BaseException) -> bool:
    if isinstance(e, ServerError):
        return e.status_code >= 500
    if isinstance(e, S3Error):
        status = getattr(e.response, "status", 0) or 0
        return e.code in _S3_BUSY or status >= 500
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from or while handling: MLflow and the
    object store wrap what the network or the server said) is an outage of a service. A
    StorageError counts only through such a cause: a missing object or a refused key is
    not one; a server's "internal error, try again" (5xx) is."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (*_OUTAGES, *_NETWORK)) or _s3_busy(e):
            return True
        if isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False
