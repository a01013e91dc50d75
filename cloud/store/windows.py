"""Uploaded windows in the object store: their .npy bytes, content hash, and reading them
back one by one or by sample id."""

from __future__ import annotations

import functools
import hashlib
import io

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from cloud.store.datasets import LabelledWindows
from cloud.store.db import Sample
from cloud.store.objects import ObjectStore
from shared.errors import DataError


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def content_sha256(window: np.ndarray) -> str:
    """The window's identity: sha256 of its .npy bytes (dtype, shape and values)."""
    window = np.ascontiguousarray(window)
    h = hashlib.sha256(_npy_header(window.dtype.str, window.shape))
    h.update(window.data)  # the bytes np.save writes after the header, without a copy
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header np.save writes for an array of ``dtype`` and ``shape`` (C order)."""
    empty = np.zeros(shape, dtype=np.dtype(dtype))
    return npy_bytes(empty)[: -empty.nbytes or None]


def load_window(store: ObjectStore, key: str, index: int | None = None) -> np.ndarray:
    """A stored window: a whole object, or row ``index`` of a batch object."""
    # allow_pickle=False: stored windows are data, never code.
    array = np.load(io.BytesIO(store.get(key)), allow_pickle=False)
    return array if index is None else array[index]


def load_samples(*, sessions: sessionmaker, store: ObjectStore, ids: list[str]) -> np.ndarray:
    """The windows of uploaded samples ``ids``, in that order; each object read once."""
    if not ids:
        return np.empty((0, 1, 1), np.float32)
    with sessions() as session:
        rows = {
            r.id: r
            for r in session.execute(
                select(Sample.id, Sample.object_key, Sample.object_index).where(Sample.id.in_(ids))
            ).all()
        }
    missing = [i for i in ids if i not in rows]
    if missing:
        raise DataError(f"{len(missing)} sample(s) are gone from the database: {missing[:3]}")
    objects = {key: load_window(store, key) for key in {r.object_key for r in rows.values()}}
    return np.stack(
        [
            objects[r.object_key]
            if r.object_index is None
            else objects[r.object_key][r.object_index]
            for r in (rows[i] for i in ids)
        ]
    ).astype(np.float32)


def load_keys(
    *, sessions: sessionmaker, store: ObjectStore, base: LabelledWindows, keys: list[str]
) -> np.ndarray:
    """Windows by replay key: ``base:<i>`` from the base data set, ``sample:<id>`` uploaded."""
    base_idx = [(n, int(k[5:])) for n, k in enumerate(keys) if k.startswith("base:")]
    sample_ids = [(n, k[7:]) for n, k in enumerate(keys) if k.startswith("sample:")]
    out = np.empty((len(keys), *base.x.shape[1:]), np.float32)
    if base_idx:
        out[[n for n, _ in base_idx]] = base.x[[i for _, i in base_idx]]
    if sample_ids:
        out[[n for n, _ in sample_ids]] = load_samples(
            sessions=sessions, store=store, ids=[i for _, i in sample_ids]
        )
    return out
