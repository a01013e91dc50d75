"""Data sets an operator registers (a base training set, the frozen golden set), kept in the
object store as .npz files of windows, labels and class names."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud.store.keys import dataset_key
from cloud.store.objects import ObjectStore
from shared.errors import DataError


@dataclass
class LabelledWindows:
    """``x`` (N, T, C) float32, ``labels`` (N,) class names."""

    x: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, class_names: list[str]) -> np.ndarray:
        return label_indices(self.labels, class_names)

    def sha256(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        h.update("\n".join(self.labels.tolist()).encode())
        return h.hexdigest()


def label_indices(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Each label's index in ``class_names``; DataError names any label not among them."""
    lookup = {c: i for i, c in enumerate(class_names)}
    missing = sorted(set(labels.tolist()) - set(lookup))
    if missing:
        raise DataError(f"labels {missing} are not among the model's classes {class_names}")
    return np.array([lookup[str(v)] for v in labels], dtype=np.int64)


def register_dataset(*, store: ObjectStore, name: str, data: LabelledWindows) -> str:
    buf = io.BytesIO()
    np.savez(
        buf,
        x=data.x.astype(np.float32),
        labels=data.labels.astype(str),
        meta=np.array(json.dumps({**data.meta, "sha256": data.sha256()})),
    )
    store.put(dataset_key(name), buf.getvalue())
    return data.sha256()


def load_dataset(*, store: ObjectStore, name: str) -> LabelledWindows:
    # allow_pickle=False: a data set is data, never code.
    with np.load(io.BytesIO(store.get(dataset_key(name))), allow_pickle=False) as z:
        return LabelledWindows(z["x"], z["labels"].astype(str), json.loads(str(z["meta"])))


def read_windows_file(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``x, y, class_names`` from an .npz written by `edgeloop data generate` (or by hand:
    x (N, T, C) float32, y (N,) class indices, class_names)."""
    try:
        # allow_pickle=False: a data file is data, never code.
        with np.load(path, allow_pickle=False) as z:
            x, y, names = z["x"].astype(np.float32), z["y"].astype(np.int64), z["class_names"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a windows file with x, y and class_names ({exc})") from exc
    if x.ndim != 3 or len(x) != len(y):
        raise DataError(f"{path}: x must be (N, T, C) with one label per window")
    if len(y) and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"{path}: labels must index class_names ({len(names)} classes)")
    return x, y, [str(n) for n in names]
