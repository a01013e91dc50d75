"""What ingest treats as an outage: errors that say the database or the object store cannot
be reached right now, never that a message is bad. A batch that raises one is retried and
nothing is acked meanwhile (a device deletes its copy only on an ack), so an outage can
never turn into a ``rejected`` ack. Anything else a message makes ingest raise is about
that message: it is dead-lettered and acked (cloud.ingest.service)."""

from __future__ import annotations

from cloud.store.outages import TRANSIENT

__all__ = ["TRANSIENT"]  # one definition, shared with the learning rounds (cloud.store.outages)
