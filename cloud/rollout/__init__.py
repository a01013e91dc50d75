"""Getting models to devices: the publisher (whole packages today) and the fleet as
operators see it. Never imports cloud.learn or cloud.ingest."""
