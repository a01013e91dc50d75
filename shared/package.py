"""The model package a device runs: ONNX graph + manifest in one canonical, hashable file.

Layout: a stored (never deflated) zip holding ``manifest.json`` then ``model.onnx``, with fixed
timestamps and permissions, so the same model always gives the same bytes and the same
sha256. The package's identity is the sha256 of the whole file; the manifest records the
sha256 of the graph (and, where the packer knows them, of every tensor).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import jsonguard
from shared.errors import PackageError

FORMAT_VERSION = 1
# Caps checked against the zip's directory before a byte is read: a package is stored, not
# deflated, so no entry can expand past what arrived, and none may exceed these.
MAX_MANIFEST_BYTES = 1 << 20
MAX_GRAPH_BYTES = 64 << 20  # shared.messages.MAX_PACKAGE_BYTES, the largest target
_CAPS = {"manifest.json": MAX_MANIFEST_BYTES, "model.onnx": MAX_GRAPH_BYTES}
# A model's standardised input is clipped to ±CLIP_SIGMA of its training spread
# (cloud.model.standardise); the manifest's ``input_range`` is that range in raw values.
# Far past real faults (TEP's reach 190 spreads: a clip at 50 would change what the model
# sees of them), far below what overflows a layer (1e38 does). The graph bakes it in, so
# it is a constant, not a setting: a device follows the range its package records.
CLIP_SIGMA = 1000.0


def model_name(fleet: str, profile: str) -> str:
    """The name of a fleet's model for one hardware profile: the package manifest's ``name``
    and the registered model's name in MLflow."""
    return f"edgeloop.{fleet}.{profile}"


_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip cannot store earlier; fixed so bytes do not depend on time


class InputSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str = "window"
    window: int = Field(ge=1)  # time steps T
    channels: int = Field(ge=1)  # C
    dtype: str = "float32"


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    parent: str | None = None
    profile: str
    input: InputSpec
    class_names: tuple[str, ...] = Field(min_length=2)
    graph_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tensor_sha256: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


def input_range(manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high), float32 (C,) each: the raw values per channel that the package's model
    standardises within ±CLIP_SIGMA. From ``metadata.input_range`` (packages since issue
    15); for an older package, estimated from its ``ood`` calibration (a channel's level
    ± CLIP_SIGMA × its spread around normal operation); None if it has neither. A range
    of the wrong shape, not finite or inverted is a bad_manifest."""
    c = manifest.input.channels
    meta = manifest.metadata
    try:
        if isinstance(meta.get("input_range"), dict):
            low = np.asarray(meta["input_range"]["low"], dtype=np.float32)
            high = np.asarray(meta["input_range"]["high"], dtype=np.float32)
        elif isinstance(meta.get("ood"), dict):
            f_mean = np.asarray(meta["ood"]["feature_mean"], dtype=np.float64)
            f_std = np.asarray(meta["ood"]["feature_std"], dtype=np.float64)
            level, spread = f_mean[:c], np.hypot(f_mean[c:], f_std[:c])
            low = (level - CLIP_SIGMA * spread).astype(np.float32)
            high = (level + CLIP_SIGMA * spread).astype(np.float32)
        else:
            return None
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"package input range unreadable: {exc}", reason="bad_manifest") from exc
    if (
        low.shape != (c,)
        or high.shape != (c,)
        or not (np.isfinite(low).all() and np.isfinite(high).all() and (low <= high).all())
    ):
        raise PackageError(
            f"package input range must be {c} finite (low, high) pairs", reason="bad_manifest"
        )
    return low, high


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def build_package(*, graph: bytes, manifest: Manifest) -> bytes:
    """Canonical package bytes; the manifest's graph hash must describe ``graph``."""
    if manifest.graph_sha256 != sha256_hex(graph):
        raise PackageError("manifest graph_sha256 does not match the graph", reason="sha_mismatch")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in (
            ("manifest.json", canonical_json(manifest.model_dump(mode="json"))),
            ("model.onnx", graph),
        ):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, data)
    return out.getvalue()


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse an entry that is compressed or larger than its cap, before reading it: a
    deflated entry could expand far past the bytes that arrived (a zip bomb)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise PackageError(
            f"package entry {info.filename} is compressed (method {info.compress_type}); "
            "packages are stored",
            reason="corrupt_package",
        )
    cap = _CAPS[info.filename]
    if info.file_size > cap or info.compress_size != info.file_size:
        raise PackageError(
            f"package entry {info.filename} claims {info.file_size} bytes "
            f"({info.compress_size} stored); the cap is {cap}",
            reason="corrupt_package",
        )


_EOCD = b"PK\x05\x06"  # the zip's end-of-central-directory record
_ENTRIES = struct.Struct("<HH")  # entries on this disk, entries in all, at offset 8


def _check_directory(data: bytes) -> None:
    """Refuse a zip whose directory claims other than two entries before zipfile reads it:
    a directory of a million entries would be a million objects in memory. (0xFFFF, a
    zip64 count, is refused too: a package never needs zip64.)"""
    at = data.rfind(_EOCD, max(0, len(data) - (1 << 16) - 22))
    if at < 0 or at + 12 > len(data):
        return  # no directory: zipfile says so by name
    entries = _ENTRIES.unpack_from(data, at + 8)
    if entries != (2, 2):
        raise PackageError(
            f"package directory claims {entries[1]} entries, expected manifest.json and model.onnx",
            reason="corrupt_package",
        )


class ModelPackage:
    """A package read from bytes, with every check done: open it, or PackageError says why."""

    def __init__(self, data: bytes, *, expected_sha256: str | None = None) -> None:
        self.sha256 = sha256_hex(data)
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise PackageError(
                f"package sha256 {self.sha256[:12]}… does not match the expected "
                f"{expected_sha256[:12]}…",
                reason="sha_mismatch",
            )
        _check_directory(data)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = zf.namelist()
                if names != ["manifest.json", "model.onnx"]:
                    raise PackageError(
                        f"package holds {names}, expected manifest.json and model.onnx",
                        reason="corrupt_package",
                    )
                for info in zf.infolist():
                    _check_entry(info)
                raw_manifest = zf.read("manifest.json")
                self.graph = zf.read("model.onnx")
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
            raise PackageError(
                f"package is corrupt or truncated: {exc}", reason="corrupt_package"
            ) from exc
        except KeyError as exc:  # pragma: no cover - namelist check above covers it
            raise PackageError(str(exc), reason="corrupt_package") from exc
        try:
            jsonguard.check(raw_manifest, max_bytes=MAX_MANIFEST_BYTES)
            self.manifest = Manifest.model_validate_json(raw_manifest)
        except jsonguard.JsonRefused as exc:
            raise PackageError(f"package manifest refused: {exc}", reason="bad_manifest") from exc
        except ValidationError as exc:
            raise PackageError(
                f"package manifest is invalid: {exc.errors()[0]['msg']}", reason="bad_manifest"
            ) from exc
        if self.manifest.format_version != FORMAT_VERSION:
            raise PackageError(
                f"package format {self.manifest.format_version} is not supported",
                reason="bad_manifest",
            )
        if sha256_hex(self.graph) != self.manifest.graph_sha256:
            raise PackageError(
                "graph bytes do not match the manifest's graph_sha256", reason="sha_mismatch"
            )

    @classmethod
    def from_path(cls, path: Path, *, expected_sha256: str | None = None) -> ModelPackage:
        return cls(Path(path).read_bytes(), expected_sha256=expected_sha256)

    @property
    def version(self) -> str:
        return self.manifest.version
