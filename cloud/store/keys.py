"""Where each kind of object lives in the object store: one function per kind of key."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def checkpoint_key(fleet: str, profile: str, version: str) -> str:
    """A round's teacher (spec + tensors, safetensors)."""
    return f"checkpoints/{fleet}/{profile}/{version}.safetensors"


def student_key(fleet: str, profile: str, version: str) -> str:
    """The FP32 student a round's package was quantized from (safetensors): where the next
    round's delta-friendly package starts (cloud.learn.close)."""
    return f"students/{fleet}/{profile}/{version}.safetensors"


def replay_key(fleet: str, profile: str, version: str) -> str:
    """A round's replay reservoir (JSON)."""
    return f"replay/{fleet}/{profile}/{version}.json"


def package_key(fleet: str, profile: str, version: str) -> str:
    """The edge package a round made (the bytes a device runs)."""
    return f"packages/{fleet}/{profile}/{version}.edgepkg"


def delta_key(fleet: str, profile: str, target_version: str, base_sha256: str) -> str:
    """A delta to a version from the package whose sha256 starts ``base_sha256[:16]``."""
    return f"deltas/{fleet}/{profile}/{target_version}.{base_sha256[:16]}.edgedelta"


def dataset_key(name: str) -> str:
    """A registered data set (.npz)."""
    return f"datasets/{name}.npz"


def window_batch_key(now: datetime | None = None) -> str:
    """A new object of uploaded windows stored together (N, T, C), by day."""
    return f"windows/batches/{now or datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4()}.npy"


def dead_letter_key(now: datetime | None = None) -> str:
    """The raw bytes of a new dead letter, by day."""
    return f"dead-letters/{now or datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4()}.bin"
