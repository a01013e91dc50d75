"""The receiver of MLflow's registry webhooks: a signed ``model_version_alias.created`` for
``champion`` on ``edgeloop.{fleet}.{profile}`` starts a rollout (through a callback, which
in production enqueues the rollout task); everything else is refused or ignored.

MLflow signs ``f"{delivery_id}.{timestamp}.{payload}"`` with HMAC-SHA256 under the webhook's
secret and sends ``X-MLflow-Signature: v1,<base64>``, ``X-MLflow-Delivery-Id`` and
``X-MLflow-Timestamp`` (Unix seconds; mlflow/webhooks/delivery.py). A call is accepted only
with a matching signature (compared in constant time), a timestamp within the tolerance of
our clock, and a delivery id not accepted before: a captured call replayed later is
refused, inside the window by its id and after it by its age.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Protocol

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shared.errors import EdgeloopError

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_VERSION = "v1"
ALIAS_EVENT = ("model_version_alias", "created")
CHAMPION = "champion"
MODEL_PREFIX = "edgeloop."  # shared.package.model_name: edgeloop.{fleet}.{profile}
MAX_BODY = 64 * 1024  # an alias event is a few hundred bytes
MIN_SECRET = 16
PLACEHOLDERS = frozenset({"changeme", "secret", "password", "edgeloop", "webhook-secret"})

# on_alias(fleet, profile, mlflow_version): what a champion move starts.
OnAlias = Callable[[str, str, str], None]


class WebhookSettings(BaseSettings):
    """The receiver's settings (EDGELOOP_WEBHOOK_*). No default secret: a receiver that
    anyone can drive would let anyone start a rollout."""

    model_config = SettingsConfigDict(
        env_prefix="EDGELOOP_WEBHOOK_", env_file=".env", extra="ignore"
    )

    secret: str = ""  # shared with MLflow (ensure_webhook), at least MIN_SECRET characters
    host: str = "127.0.0.1"
    port: int = 8765
    # What MLflow delivers to, when the receiver sits behind a proxy or another name
    # (default: http://host:port/hooks/mlflow).
    url: str = ""
    # The MLflow webhook's name: one per receiver (ensure_webhook updates it in place).
    name: str = "edgeloop-rollouts"
    # How far a delivery's timestamp may be from our clock; MLflow retries within seconds.
    tolerance_s: Annotated[float, Field(gt=0)] = 300.0

    @field_validator("secret")
    @classmethod
    def _strong(cls, value: str) -> str:
        if value and (len(value) < MIN_SECRET or value.lower() in PLACEHOLDERS):
            raise ValueError(
                f"EDGELOOP_WEBHOOK_SECRET is a placeholder or shorter than {MIN_SECRET} characters"
            )
        return value

    @property
    def delivery_url(self) -> str:
        return self.url or f"http://{self.host}:{self.port}/hooks/mlflow"


class WebhookError(EdgeloopError):
    """A webhook call refused: ``status`` is the HTTP answer, ``reason`` says why."""

    reason = "bad_webhook"

    def __init__(self, message: str, *, reason: str, status: int = 401) -> None:
        super().__init__(message, reason=reason)
        self.status = status


def sign(secret: str, delivery_id: str, timestamp: str, payload: str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (v1, base64)."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{payload}".encode(), hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode()}"


def parse_model_name(name: str) -> tuple[str, str] | None:
    """``(fleet, profile)`` of ``edgeloop.{fleet}.{profile}``; None for another model. A fleet
    name may hold dots, a profile name does not (cloud/compress/profiles.toml)."""
    if not name.startswith(MODEL_PREFIX):
        return None
    fleet, dot, profile = name.removeprefix(MODEL_PREFIX).rpartition(".")
    return (fleet, profile) if dot and fleet and profile else None


class Verifier:
    """Checks a delivery's signature, age and novelty. One per receiver process: the
    delivery ids it remembers live in memory, for twice the tolerance (an older id's call
    is refused by its timestamp anyway)."""

    def __init__(
        self,
        secret: str,
        *,
        tolerance_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        shared: SeenStore | None = None,
    ) -> None:
        """``shared``: where the receivers of one deployment (replicas, restarts) record the
        delivery ids they took, so a replay to another one is refused too."""
        if len(secret) < MIN_SECRET:
            raise ValueError(f"the webhook secret must have at least {MIN_SECRET} characters")
        self._secret = secret
        self.tolerance_s = tolerance_s
        self._clock = clock
        self._seen: dict[str, float] = {}  # delivery id → when it may be forgotten
        self._pending: set[str] = set()  # being handled now: a concurrent copy waits its turn
        self._lock = threading.Lock()
        self._shared = shared

    def check(self, headers: Mapping[str, str], body: bytes) -> str:
        """The delivery id of a genuine, fresh, first-seen call (reserved until ``done`` or
        ``release``); else WebhookError."""
        signature = headers.get(SIGNATURE_HEADER)
        delivery = headers.get(DELIVERY_HEADER)
        stamp = headers.get(TIMESTAMP_HEADER)
        if not signature or not delivery or not stamp:
            raise WebhookError("unsigned call", reason="unsigned")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WebhookError("payload is not UTF-8", reason="bad_signature") from exc
        expected = sign(self._secret, delivery, stamp, payload)
        # compare_digest: the time taken does not tell a forger how much of it was right.
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise WebhookError("signature does not match", reason="bad_signature")
        try:
            sent = float(stamp)
        except ValueError as exc:
            raise WebhookError(f"timestamp {stamp!r} is no number", reason="bad_timestamp") from exc
        now = self._clock()
        if abs(now - sent) > self.tolerance_s:
            raise WebhookError(
                f"timestamp is {now - sent:+.0f} s from ours (tolerance {self.tolerance_s:.0f} s)",
                reason="stale",
                status=400,
            )
        with self._lock:
            self._seen = {d: t for d, t in self._seen.items() if t > now}
            if delivery in self._seen or delivery in self._pending:
                raise WebhookError(
                    f"delivery {delivery} seen before", reason="replayed", status=400
                )
            if self._shared is not None and not self._shared.claim(
                delivery, ttl_s=2 * self.tolerance_s
            ):
                raise WebhookError(
                    f"delivery {delivery} taken by another receiver", reason="replayed", status=400
                )
            self._pending.add(delivery)
        return delivery

    def done(self, delivery: str) -> None:
        """The delivery was handled: any later call with its id is a replay."""
        with self._lock:
            self._pending.discard(delivery)
            self._seen[delivery] = self._clock() + 2 * self.tolerance_s

    def release(self, delivery: str) -> None:
        """Handling failed: MLflow's retry of the same delivery is let in."""
        with self._lock:
            self._pending.discard(delivery)
        if self._shared is not None:
            self._shared.unclaim(delivery)


class SeenStore(Protocol):
    """Delivery ids shared by every receiver of a deployment (Redis in production)."""

    def claim(self, delivery: str, *, ttl_s: float) -> bool:
        """True if no receiver took ``delivery`` before; it is taken for ``ttl_s``."""
        ...

    def unclaim(self, delivery: str) -> None: ...


class RedisSeen:
    """SeenStore in Redis: SET NX with an expiry, atomic across receivers."""

    def __init__(self, client: redis.Redis, *, prefix: str = "edgeloop:webhook:") -> None:
        """``client``: from cloud.store.connect.redis_client (the settings' TLS and
        credentials)."""
        self.redis, self.prefix = client, prefix

    def claim(self, delivery: str, *, ttl_s: float) -> bool:
        return bool(self.redis.set(self.prefix + delivery, 1, nx=True, ex=max(1, int(ttl_s))))

    def unclaim(self, delivery: str) -> None:
        self.redis.delete(self.prefix + delivery)


@dataclass(frozen=True)
class AliasEvent:
    model: str
    alias: str
    version: str


def parse_event(body: bytes) -> AliasEvent | None:
    """The alias event in a delivery; None for any other event (acknowledged, ignored)."""
    try:
        doc = json.loads(body)
        event = (doc["entity"], doc["action"])
        data = doc["data"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # deep nesting recurses
        raise WebhookError(
            f"not an MLflow webhook payload: {str(exc)[:200]}", reason="bad_payload", status=400
        ) from exc
    if event != ALIAS_EVENT:
        return None
    try:
        return AliasEvent(str(data["name"]), str(data["alias"]), str(data["version"]))
    except (KeyError, TypeError) as exc:
        raise WebhookError(f"alias event without {exc}", reason="bad_payload", status=400) from exc


def handle(verifier: Verifier, on_alias: OnAlias, headers: Mapping[str, str], body: bytes) -> dict:
    """One delivery, free of HTTP: what to answer (a dict), or WebhookError. ``on_alias``
    runs for a champion move of an edgeloop model; if it raises, the delivery is not
    remembered, so MLflow's retry gets another chance."""
    delivery = verifier.check(headers, body)
    try:
        event = parse_event(body)
        if event is None:
            verifier.done(delivery)
            return {"status": "ignored"}
        names = parse_model_name(event.model)
        if event.alias != CHAMPION or names is None:
            log.info("alias %s of %s moved to version %s: ignored", event.alias, event.model,
                     event.version)  # fmt: skip
            verifier.done(delivery)
            return {"status": "ignored", "model": event.model, "alias": event.alias}
        fleet, profile = names
        on_alias(fleet, profile, event.version)
    except BaseException:
        verifier.release(delivery)
        raise
    verifier.done(delivery)
    log.info("champion of %s moved to version %s: rollout queued", event.model, event.version)
    return {"status": "queued", "fleet": fleet, "profile": profile, "version": event.version}


def build_app(*, verifier: Verifier, on_alias: OnAlias) -> Starlette:
    """``POST /hooks/mlflow`` and ``GET /healthz``."""

    async def hook(request: Request) -> JSONResponse:
        too_large = JSONResponse({"error": "payload too large"}, status_code=413)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return too_large
        body = b""
        async for chunk in request.stream():  # capped as it arrives (chunked bodies too)
            body += chunk
            if len(body) > MAX_BODY:
                return too_large
        try:
            # The callback may block (a broker round trip): off the event loop.
            answer = await run_in_threadpool(handle, verifier, on_alias, request.headers, body)
        except WebhookError as exc:
            log.warning("webhook refused (%s): %s", exc.reason, exc)
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        except Exception as exc:  # the callback failed (broker down): MLflow retries a 503
            log.error("webhook callback failed: %r", exc)
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return JSONResponse(answer)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/hooks/mlflow", hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


class WebhookServer:
    """The receiver on a uvicorn server in a thread of this process (the command's, or a
    test's): ``start()``, ``stop()``; ``port`` is the one it bound (0 picks a free one)."""

    def __init__(
        self,
        *,
        secret: str,
        on_alias: OnAlias,
        host: str = "127.0.0.1",
        port: int = 0,
        tolerance_s: float = 300.0,
        shared: SeenStore | None = None,
    ) -> None:
        import socket

        import uvicorn

        self.verifier = Verifier(secret, tolerance_s=tolerance_s, shared=shared)
        self.app = build_app(verifier=self.verifier, on_alias=on_alias)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks/mlflow"

    def serve(self) -> None:
        """Serve in this thread until ``stop()`` (or SIGINT/SIGTERM, which uvicorn handles
        when this is the main thread)."""
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 10.0) -> WebhookServer:
        self._thread = threading.Thread(target=self.serve, name="webhook", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the webhook receiver did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
