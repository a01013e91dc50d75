"""Object storage behind one small interface: S3 (MinIO SDK, any S3 API) or a local directory.

Writes are whole-object and atomic on both backends: a reader sees all of an object or
none of it, which is what lets ingest ack only after a put returned.
"""

from __future__ import annotations

import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from cloud.config import CloudSettings
from shared.errors import EdgeloopError


class StorageError(EdgeloopError):
    reason = "storage_unavailable"


class ObjectNotFound(StorageError):
    reason = "object_not_found"


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"object key {key!r} is not a clean relative path", reason="bad_key")
    return key


class LocalObjectStore:
    """A directory; each put lands in a temp file that is fsynced, then renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key!r}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        keys = (
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".put-")
        )
        return sorted(k for k in keys if k.startswith(prefix))


class S3ObjectStore:
    """Any S3 API through the MinIO SDK (MinIO in production, SeaweedFS in tests)."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        ca_file: str | None = None,
        region: str | None = None,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 20.0,
    ) -> None:
        """``ca_file``: the CA that signed the endpoint's certificate (a private MinIO);
        default: the system's. The certificate and host name are always checked over TLS."""
        import urllib3
        from minio import Minio

        # Short timeouts and few retries: a store that is down must surface as an error the
        # caller can act on (ingest withholds its ack), not as a minute-long hang.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2),
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_file,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self.bucket = bucket
        self._call(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # two processes starting at once: the other made it
                taken = exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
                if not taken or not self.client.bucket_exists(self.bucket):
                    raise

    def _call(self, fn, *args):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(f"no object {args[0] if args else ''!r}") from exc
            raise StorageError(f"S3 error {exc.code}: {exc.message}") from exc
        except (HTTPError, OSError) as exc:
            raise StorageError(f"S3 endpoint unreachable: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        self._call(
            lambda k: self.client.put_object(self.bucket, k, io.BytesIO(data), len(data)),
            _check_key(key),
        )

    def get(self, key: str) -> bytes:
        def read(k: str) -> bytes:
            resp = self.client.get_object(self.bucket, k)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(read, _check_key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(lambda k: self.client.stat_object(self.bucket, k), _check_key(key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(lambda k: self.client.remove_object(self.bucket, k), _check_key(key))

    def presigned_get(self, key: str, *, expires: timedelta = timedelta(hours=6)) -> str:
        """A URL that lets its holder GET this one object until ``expires`` from now (for
        devices that can reach the store; they verify what they fetch themselves)."""
        return self._call(
            lambda k: self.client.presigned_get_object(self.bucket, k, expires=expires),
            _check_key(key),
        )

    def list(self, prefix: str = "") -> list[str]:
        return self._call(
            lambda p: sorted(
                o.object_name
                for o in self.client.list_objects(self.bucket, prefix=p, recursive=True)
            ),
            prefix,
        )


def open_store(settings: CloudSettings) -> ObjectStore:
    """The store the settings name (``EDGELOOP_STORE``)."""
    if settings.store == "s3":
        return S3ObjectStore(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            ca_file=str(settings.s3_ca_file) if settings.s3_ca_file else None,
            region=settings.s3_region,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
        )
    return LocalObjectStore(settings.home / "objects")


# -- retention (cloud.retention): what deleting an object frees ----------------------------------


def object_size(store: ObjectStore, key: str) -> int:
    """The bytes of object ``key`` (0 when there is none), without reading it where the
    backend can say (S3 stat, a file's size)."""
    if isinstance(store, S3ObjectStore):
        try:
            stat = store._call(lambda k: store.client.stat_object(store.bucket, k), _check_key(key))
        except ObjectNotFound:
            return 0
        return int(stat.size or 0)
    if isinstance(store, LocalObjectStore):
        path = store._path(key)
        return path.stat().st_size if path.is_file() else 0
    return len(store.get(key)) if store.exists(key) else 0
