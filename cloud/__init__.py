"""The cloud side: ingest, storage, training, registry and publishing of models."""
