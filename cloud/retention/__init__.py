"""Retention: what expires by policy, what garbage collection must never delete, and the
collection itself (``edgeloop cloud gc`` and the daily beat task)."""
