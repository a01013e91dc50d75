"""One contract suite for the object store, run against both backends."""

from __future__ import annotations

import pytest

from cloud.store.objects import LocalObjectStore, ObjectNotFound, StorageError


class ObjectStoreContract:
    """Subclasses provide a ``store`` fixture; every backend must pass these."""

    def test_put_get_round_trip(self, store):
        """What is put comes back byte for byte."""
        store.put("windows/ab/abc.npy", b"\x00\x01payload")
        assert store.get("windows/ab/abc.npy") == b"\x00\x01payload"

    def test_overwrite_replaces_whole_object(self, store):
        """A second put of the same key replaces the object completely."""
        store.put("k/one", b"long original content")
        store.put("k/one", b"short")
        assert store.get("k/one") == b"short"

    def test_exists_and_delete(self, store):
        """exists follows put and delete; deleting twice is harmless."""
        assert not store.exists("a/b")
        store.put("a/b", b"x")
        assert store.exists("a/b")
        store.delete("a/b")
        store.delete("a/b")
        assert not store.exists("a/b")

    def test_missing_object_is_a_named_error(self, store):
        """Reading a key that is not there raises ObjectNotFound."""
        with pytest.raises(ObjectNotFound):
            store.get("nope/missing")

    def test_list_by_prefix(self, store):
        """list returns the keys under a prefix, sorted."""
        for key in ("d/2", "d/1", "e/1"):
            store.put(key, b"v")
        assert store.list("d/") == ["d/1", "d/2"]
        assert store.list() == ["d/1", "d/2", "e/1"]

    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b"])
    def test_unclean_keys_are_refused(self, store, key):
        """Keys that could escape or alias are refused with StorageError."""
        with pytest.raises(StorageError):
            store.put(key, b"x")


class TestLocalObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalObjectStore(tmp_path / "objects")


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, s3_store):
        return s3_store


def test_unreachable_s3_is_a_storage_error():
    """An S3 endpoint that does not answer raises StorageError quickly, not a hang."""
    from cloud.store.objects import S3ObjectStore

    with pytest.raises(StorageError):
        S3ObjectStore(endpoint="127.0.0.1:9", access_key="a", secret_key="b", bucket="nobucket")


def test_processes_starting_together_on_a_new_bucket_all_open_it():
    """Six stores opening one bucket that does not exist yet, at once (ingest replicas
    starting together): one creates it and none fails on the other's creation."""
    import threading
    import uuid

    from cloud.store.objects import S3ObjectStore

    from .conftest import HOST, S3_KEY, S3_PORT, S3_SECRET, require

    require("SeaweedFS S3", S3_PORT)
    bucket, errors, opened = f"race-{uuid.uuid4().hex[:10]}", [], []
    start = threading.Barrier(6)

    def open_store() -> None:
        start.wait()
        try:
            opened.append(S3ObjectStore(endpoint=f"{HOST}:{S3_PORT}", access_key=S3_KEY,
                                        secret_key=S3_SECRET, bucket=bucket))  # fmt: skip
        except StorageError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == [] and len(opened) == 6
    finally:
        if opened:
            opened[0].client.remove_bucket(bucket)
