"""Ingest: device uploads validated, stored idempotently, dead-lettered and acked. Uses
only cloud.store and shared."""
