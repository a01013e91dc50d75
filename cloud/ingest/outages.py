"""What ingest treats as an outage: errors that say the database or the object store cannot
be reached right now, never that a message is bad. A batch that raises one is retried and
nothing is acked meanwhile (a device deletes its copy only on an ack), so an outage can
never turn into a ``rejected`` ack. Anything else a message makes ingest raise is about
that message: it is dead-lettered and acked (cloud.ingest.service)."""

from __future__ import annotations

from psycopg import InterfaceError as PgInterfaceError
from psycopg import OperationalError as PgOperationalError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

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
