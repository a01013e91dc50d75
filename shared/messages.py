"""Every payload on the wire, declared once: versioned pydantic models and their JSON codec.

Tensors travel as raw little-endian bytes (base64 in the JSON envelope) with their dtype
and shape — never pickle, which would let a sender run code on the receiver.
"""

from __future__ import annotations

import base64
import binascii
import math
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from shared.errors import MessageError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # samples, labels, heartbeats, acks
MAX_UPDATE_MESSAGE_BYTES = 4 << 20  # an offer (metadata) or one chunk
MAX_PACKAGE_BYTES = 64 << 20  # the largest target a device downloads
MAX_TENSOR_ELEMENTS = 1 << 16
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
LabelSource = Literal["device", "operator", "teacher"]


# -- hostile input (issue 15): names hold no control or format characters ------------------
def printable_name(value: str) -> str:
    """``value``, unless it holds a Unicode control or format character (category Cc or
    Cf: a right-to-left override, a zero-width joiner, an escape), which would make a class,
    a device or a model version read as another in a log, a table or the MLflow UI."""
    if value.isascii() and value.isprintable():
        return value  # the common case, checked in C
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise PydanticCustomError(
                "bad_name",
                "holds the control or format character U+{code} ({name})",
                {"code": f"{ord(char):04X}", "name": unicodedata.name(char, "unnamed")},
            )
    return value


# Every name fits the database's String(64) columns and no text carries a NUL, which
# PostgreSQL refuses: a message that passes here can always be stored.
Name = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[^\x00]+$"),
    AfterValidator(printable_name),
]
Text = Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Tensor(BaseModel):
    """An n-d array as little-endian bytes, its dtype and shape."""

    model_config = ConfigDict(frozen=True)

    dtype: Literal["float32", "float64", "int32", "int64", "uint8"]
    shape: tuple[Annotated[int, Field(ge=1, le=MAX_TENSOR_ELEMENTS)], ...] = Field(
        min_length=1, max_length=4
    )
    data: str  # base64

    @classmethod
    def from_array(cls, array: np.ndarray) -> Tensor:
        name = str(array.dtype)
        if name not in ALLOWED_DTYPES:
            raise MessageError(
                f"dtype {name} cannot go on the wire; use one of {ALLOWED_DTYPES}",
                reason="bad_dtype",
            )
        little = np.ascontiguousarray(array, dtype=np.dtype(name).newbyteorder("<"))
        return cls.model_validate(
            {
                "dtype": name,
                "shape": tuple(int(s) for s in array.shape),
                "data": base64.b64encode(little.tobytes()).decode("ascii"),
            }
        )

    def to_array(self) -> np.ndarray:
        """Decode and check: byte count must match dtype × shape, floats must be finite."""
        n = math.prod(self.shape)
        if n > MAX_TENSOR_ELEMENTS:
            raise MessageError(
                f"tensor of {n} elements exceeds {MAX_TENSOR_ELEMENTS}", reason="tensor_too_large"
            )
        try:
            # Strict: only the base64 alphabet and correct padding (checked in C; measured
            # a third faster than b64decode(validate=True), whose check is a regex).
            raw = binascii.a2b_base64(self.data, strict_mode=True)
        except ValueError as exc:
            raise MessageError(f"tensor data is not base64: {exc}", reason="bad_tensor") from exc
        dtype = np.dtype(self.dtype).newbyteorder("<")
        if len(raw) != n * dtype.itemsize:
            raise MessageError(
                f"tensor has {len(raw)} bytes, shape {self.shape} of {self.dtype} needs "
                f"{n * dtype.itemsize}",
                reason="bad_shape",
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(self.dtype)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise MessageError("tensor holds NaN or infinity", reason="non_finite")
        return array


class Envelope(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    message_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    fleet: Name
    device_id: Name
    sent_at: AwareDatetime = Field(default_factory=utcnow)

    def encode(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class SampleMessage(Envelope):
    """One window the device chose to upload, with what its model made of it."""

    kind: ClassVar[str] = "samples"
    window: Tensor  # (T, C) float32
    channels: int = Field(ge=1, le=1024)
    captured_at: AwareDatetime
    model_version: Name
    predicted: Name
    confidence: float = Field(ge=0.0, le=1.0)
    score: float = Field(allow_inf_nan=False)
    reasons: tuple[Literal["uncertain", "faulty", "ood"], ...] = ()


class LabelMessage(Envelope):
    """Ground truth that arrived after the fact, for windows already uploaded."""

    kind: ClassVar[str] = "labels"
    sample_ids: tuple[uuid.UUID, ...] = Field(min_length=1, max_length=1000)
    label: Name
    source: LabelSource = "device"


class Heartbeat(Envelope):
    """The device's state, every ``heartbeat_s``: what it runs, how it is doing, what it can
    take. Not buffered: the next one supersedes a lost one."""

    kind: ClassVar[str] = "heartbeat"
    model_version: Name | None
    profile: Name
    buffer_depth: int = Field(ge=0)
    windows_seen: int = Field(ge=0)
    anomaly_rate: float = Field(ge=0.0, le=1.0)
    latency_ms_p50: float = Field(ge=0.0, allow_inf_nan=False)
    buffer_evicted: int = Field(default=0, ge=0)  # dropped from a full buffer since first start
    skipped_budget: int = Field(default=0, ge=0)  # candidates held back by the byte budget
    skipped_duplicate: int = Field(default=0, ge=0)  # …and by the diversity rule
    online: bool = True
    # What the rollout judges canaries on. The anomaly rate is over the last
    # ``recent_windows`` windows of the model now live (the count resets on a swap), so
    # rate × windows is a count a two-proportion test can use.
    recent_windows: int = Field(default=0, ge=0)
    latency_ms_p99: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    memory_mb: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)  # resident set now, not peak
    inference_errors: int = Field(default=0, ge=0)  # windows the live model failed on
    agent_version: Name | None = None
    # What the agent can take: "tuf" (signed releases) and the payload kinds it applies
    # ("package", and "delta" where it applies deltas: only those are offered one).
    capabilities: tuple[Name, ...] = Field(default=(), max_length=32)
    release: int | None = Field(default=None, ge=0)  # the newest signed release it has seen


class Ack(Envelope):
    """The cloud's application-level ack: these messages are durable (or dead-lettered), or,
    with status ``retry``, not taken now: the device keeps them and sends them again after
    ``retry_after_s`` (its upload quota is spent). Never ``rejected`` for that, which makes
    the device drop its only copy.

    Agents older than ``retry`` cannot decode such an ack (an unknown status, and the
    envelope forbids unknown fields): they log it and ignore it, so the message stays in
    their buffer and is resent after their ``resend_after_s``, which is safe. The other
    statuses go out without the ``retry_after_s`` field, so old agents decode them."""

    kind: ClassVar[str] = "acks"
    acked_ids: tuple[uuid.UUID, ...] = Field(min_length=1)
    status: Literal["stored", "duplicate", "rejected", "retry"]
    reason: Text | None = None
    retry_after_s: float | None = Field(default=None, ge=0, le=86_400, allow_inf_nan=False)

    def encode(self) -> bytes:
        if self.retry_after_s is None:  # as agents before ``retry`` expect it
            return self.model_dump_json(exclude={"retry_after_s"}).encode("utf-8")
        return super().encode()


PayloadKind = Literal["package", "delta"]
UPDATE_REASONS = (
    # Every reason a device refuses or fails an update with (UpdateStatus.reason).
    "bad_signature",  # a signature is missing, bad, or below its role's threshold
    "missing_metadata",  # the offer lacks metadata the device needs
    "rollback_attack",  # metadata older than what the device has seen
    "expired_metadata",  # metadata past its expiry (a freeze), by the device's clock
    "mix_and_match",  # the target is for another fleet, profile or device
    "endless_data",  # the download is longer than the signed length
    "bad_hash",  # the download does not match the signed hashes
    "transfer_failed",  # chunks stopped arriving or were corrupt
    "smoke_check_failed",  # the package loaded but failed its check on the device
    "corrupt_package",
    "inference_error",  # the live model failed on real windows: rolled back at once
    "internal_error",
)


class UpdateOffer(Envelope):
    """The cloud's nudge: a signed release may assign this device a new model. It carries the
    TUF metadata (file name → JSON text) the device's updater reads, so a device that
    reaches only the broker can verify; the device itself finds its target in the signed
    metadata, so a replayed or forged offer can name nothing the release does not assign."""

    kind: ClassVar[str] = "updates"
    type: Literal["offer"] = "offer"
    release: int = Field(ge=1)  # the releases role's version: the release counter
    target: Text  # the TUF target path the cloud expects this device to fetch
    payload_kind: PayloadKind = "package"
    length: int = Field(ge=1, le=MAX_PACKAGE_BYTES)  # as offered; the signed length binds
    chunk_size: int = Field(ge=1024, le=256 << 10)
    metadata: dict[Annotated[str, Field(max_length=128)], str] = Field(max_length=64)
    url: Text | None = None  # a presigned S3 URL, where the device can reach object storage


class UpdateChunk(Envelope):
    """One piece of a target, answering a ChunkRequest: the device writes it at
    ``index × chunk_size`` of its partial file and checks its hash first."""

    kind: ClassVar[str] = "updates"
    type: Literal["chunk"] = "chunk"
    target: Text
    index: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of this chunk: transport, not trust
    data: str  # base64


class UpdateStatus(Envelope):
    """An update's outcome on the device (buffered until the cloud acks it)."""

    kind: ClassVar[str] = "update-status"
    type: Literal["status"] = "status"
    target_version: Name
    status: Literal["applied", "rejected", "rolled_back", "failed"]
    reason: Text | None = None  # one of UPDATE_REASONS when rejected, failed or rolled back
    running_version: Name | None = None
    release: int | None = Field(default=None, ge=0)
    # How the target arrived: the payload the device applied ("spare": made live with no
    # download, from its spare slot or already live), the bytes it received for it (a
    # refused delta's and then the package's), and why it refused a delta signed for it.
    payload: Literal["package", "delta", "spare"] | None = None
    received_bytes: int | None = Field(default=None, ge=0, le=2 * MAX_PACKAGE_BYTES)
    delta_refused: Text | None = None


class ChunkRequest(Envelope):
    """The device asks for chunks ``first`` … ``first + count - 1`` of a target (not
    buffered: it asks again when they do not come)."""

    kind: ClassVar[str] = "update-status"
    type: Literal["chunks"] = "chunks"
    target: Text
    release: int = Field(ge=1)
    first: int = Field(ge=0)
    count: int = Field(ge=1, le=64)


MESSAGE_TYPES: dict[str, Any] = {m.kind: m for m in (SampleMessage, LabelMessage, Heartbeat, Ack)}
# Two topics carry two message types each, told apart by their ``type`` field.
MESSAGE_TYPES["updates"] = TypeAdapter(
    Annotated[UpdateOffer | UpdateChunk, Field(discriminator="type")]
)
MESSAGE_TYPES["update-status"] = TypeAdapter(
    Annotated[UpdateStatus | ChunkRequest, Field(discriminator="type")]
)


def decode(kind: str, raw: bytes) -> Any:
    """Parse and validate ``raw`` as a message of ``kind``; MessageError says why not."""
    model = MESSAGE_TYPES.get(kind)
    if model is None:
        raise MessageError(f"no message kind {kind!r}", reason="bad_kind")
    limit = MAX_UPDATE_MESSAGE_BYTES if kind == "updates" else MAX_MESSAGE_BYTES
    if len(raw) > limit:
        raise MessageError(f"{kind} message of {len(raw)} bytes exceeds {limit}", reason="oversize")
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        version = _peek_version(raw)
        if version is not None and version != SCHEMA_VERSION:
            raise MessageError(
                f"schema_version {version!r} is not supported (this side speaks {SCHEMA_VERSION})",
                reason="bad_schema_version",
            ) from exc
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        reason = {"json_invalid": "bad_json", "bad_name": "bad_name"}.get(
            first["type"], "bad_schema"
        )
        raise MessageError(
            f"invalid {kind} message: {where}: {first['msg']}", reason=reason
        ) from exc


def _peek_version(raw: bytes) -> object | None:
    import json

    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting: json's C parser recurses
        return None
    return value.get("schema_version") if isinstance(value, dict) else None
