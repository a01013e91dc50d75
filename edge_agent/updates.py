"""The device's update path: a signed offer in, the target its release assigns this device
verified (TUF), downloaded (edge_agent.transfer), installed in the spare slot, reported.

paho's network thread only hands offers to a one-place mailbox and chunks to the
download; everything that takes time runs on one updater thread, so acks keep flowing
and detection goes on with the live model while a package downloads and loads. Every
refusal or failure is reported with a reason from ``shared.messages.UPDATE_REASONS``,
and the live model keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edge_agent.config import EdgeSettings
from edge_agent.deltas import DeltaPath, Refused
from edge_agent.runtime import ModelRuntime
from edge_agent.transfer import (
    Download,
    TransferCancelled,
    Transfers,
)
from edge_agent.updater import ModelSlots
from edge_agent.urlfetch import allowed_url
from shared.errors import PackageError
from shared.messages import UPDATE_REASONS, ChunkRequest, UpdateChunk, UpdateOffer, UpdateStatus
from shared.trust import DeviceTrust, Target, UpdateRefused

log = logging.getLogger(__name__)
PAYLOAD_KINDS = ("package", "delta")  # the apply steps this agent has
# A package check's reason → the status and UPDATE_REASONS entry reported for it.
_INSTALL_OUTCOMES = {
    "smoke_check_failed": ("failed", "smoke_check_failed"),
    "bad_graph": ("failed", "smoke_check_failed"),  # ONNX Runtime cannot load it here
    "bad_output": ("failed", "smoke_check_failed"),
    "sha_mismatch": ("rejected", "bad_hash"),
    "wrong_profile": ("rejected", "mix_and_match"),
}
# Reasons that are the link's or the device's fault, not the release's.
_FAILURES = ("transfer_failed", "internal_error")
Report = Callable[..., UpdateStatus]


class Updates:
    """Offers and chunks in, an installed model and a report out; see the module docstring.
    ``swap(runtime)`` puts a new model live; ``report(version, status, reason,
    release=...)`` makes an UpdateStatus durable."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        slots: ModelSlots,
        slots_lock: threading.Lock,
        send: Callable[[ChunkRequest], bool],
        online: Callable[[], bool],
        running: Callable[[], ModelRuntime | None],
        swap: Callable[[ModelRuntime], None],
        report: Report,
    ) -> None:
        self.settings = s = settings
        self.slots, self._slots_lock = slots, slots_lock
        self.running, self.swap, self.report = running, swap, report
        self.trust = self._open_trust()
        self.transfers = Transfers(
            s.state_dir / "downloads",
            fleet=s.fleet,
            device_id=s.device_id,
            send=send,
            window=s.transfer_window,
            retry_s=s.transfer_retry_s,
            stall_s=s.transfer_stall_s,
            url_timeout_s=s.url_timeout_s,
            url_deadline_s=s.url_deadline_s,
            online=online,
        )
        self.deltas = DeltaPath(
            enabled=s.deltas,
            trust=lambda: self.trust,
            transfers=self.transfers,
            slots=slots,
            slots_lock=slots_lock,
            swap=swap,
            begin=self._begin,
            report=report,
            install_failed=self._install_failed,
        )
        self._offers = LatestOffer()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edge-updater", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if not self.trust.enrolled():
            log.warning(
                "this device holds no fleet root: every update offer will be refused "
                "(missing_metadata) until `edgeloop edge enroll --root FILE`"
            )
        if self.settings.fetch_urls and not self.settings.url_hosts:
            log.warning(
                "fetch_urls is set but fetch_url_hosts is empty: offers' URLs are ignored "
                "(set EDGELOOP_EDGE_FETCH_URL_HOSTS to the object store's host:port)"
            )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        current = self.transfers.current
        if current is not None:
            current.cancel()  # what it holds stays on disk for the next start
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def enroll(self, root: bytes) -> None:
        """Take the fleet's root metadata (``edgeloop fleet enroll`` hands it out)."""
        DeviceTrust.enroll(self.settings.trust_dir, root)
        self.trust = self._open_trust()
        log.info("enrolled in fleet %s's signed releases", self.settings.fleet)

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What heartbeats say this agent takes: signed releases and its payload kinds."""
        kinds = PAYLOAD_KINDS if self.settings.deltas else ("package",)
        return ("tuf", *kinds)

    def last_release(self) -> int | None:
        return self.trust.last_release() if self.trust.enrolled() else None

    def _open_trust(self) -> DeviceTrust:
        s = self.settings
        return DeviceTrust(s.trust_dir, fleet=s.fleet, device_id=s.device_id, profile=s.profile)

    # -- paho's network thread ----------------------------------------------------------------
    def offer(self, offer: UpdateOffer) -> None:
        """Queue an offer; a newer release supersedes a waiting one and a running download."""
        if self._offers.put(offer):
            current = self.transfers.current
            if current is not None and current.release < offer.release:
                current.cancel()

    def deliver(self, chunk: UpdateChunk) -> None:
        self.transfers.deliver(chunk)

    # -- the updater thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            offer = self._offers.take(timeout=0.5)
            if offer is None or self._stopping.is_set():
                continue
            try:
                self.handle(offer)
            except Exception as exc:  # noqa: BLE001 - this thread is the device's only updater
                # What handle() did not report itself (a bug, or a report that failed):
                # said once more if possible; the next offer is taken all the same.
                log.exception("update offer of release %d failed", offer.release)
                try:
                    self.report(
                        _version_of(offer.target),
                        "failed",
                        "internal_error",
                        release=offer.release,
                    )
                except Exception:  # noqa: BLE001
                    log.exception("and its failure could not be reported (%s)", exc)

    def handle(self, offer: UpdateOffer) -> UpdateStatus | None:
        """Verify an offer's release, fetch the target it assigns this device and install
        it. None when there is nothing to report (superseded, or nothing assigned)."""
        wanted = _version_of(offer.target)
        if not self.trust.enrolled():
            log.error(
                "update offer (release %d) refused: this device holds no fleet root; "
                "enroll it with `edgeloop edge enroll --root FILE`",
                offer.release,
            )
            return self.report(wanted, "rejected", "missing_metadata", release=offer.release)
        download: Download | None = None
        try:
            target = self.trust.resolve(offer.metadata, offered=offer.target)
            if target is None:
                log.info("release %d assigns this device nothing", offer.release)
                return None
            wanted = target.version
            runtime = self.running()
            if runtime is not None and runtime.package.sha256 == target.sha256:
                # Already live (a repeated offer, or a release that keeps this device's
                # model): say so, so the rollout counts it as installed.
                return self.report(wanted, "applied", None, release=target.release,
                                   payload="spare", received_bytes=0)  # fmt: skip
            reused = self._from_spare(target)
            if reused is not None:  # the model it ran before (a rollback): no download
                return reused
            if target.kind != "package":
                raise UpdateRefused(
                    f"payload kind {target.kind!r} cannot be applied here",
                    reason="corrupt_package",
                )
            delta = self.deltas.pick(target, runtime)
            refused: Refused | None = None
            if delta is not None:
                outcome = self.deltas.take(offer, target, delta)
                if not isinstance(outcome, Refused):
                    return outcome  # installed (or failed as a package would), or superseded
                refused = outcome  # the whole package comes instead
            download = self._begin(offer, target)
            data = self.trust.download(target, offer.metadata, download.chunks)
            download.discard()  # TUF verified the bytes, which are in hand
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal
            return self._refused(offer, wanted, download, exc)
        finally:
            if download is not None:
                self.transfers.end(download)
        return self._install(
            target,
            data,
            payload="package",
            received_bytes=len(data) + (refused.received if refused else 0),
            delta_refused=refused.reason if refused else None,
        )

    def _begin(self, offer: UpdateOffer, target: Target) -> Download:
        """Start (or resume) the download of ``target``: the offer's length and URL where
        the offer names this target, the signed length where it names another (a delta's
        offer whose device takes the package)."""
        offered = offer.target == target.path
        return self.transfers.begin(
            target=target.path,
            release=offer.release,
            sha256=target.sha256,
            length=transfer_length(
                offered=offer.length if offered else target.length,
                signed=target.length,
                chunk_size=offer.chunk_size,
            ),
            chunk_size=offer.chunk_size,
            url=self._url(offer) if offered else None,
        )

    def _from_spare(self, target: Target) -> UpdateStatus | None:
        """The target made live from the spare slot, when that holds its exact bytes (the
        signed sha256: as good as a download TUF verified)."""
        with self._slots_lock:
            runtime = self.slots.activate_spare(target.sha256)
            if runtime is None:
                return None
            self.swap(runtime)
        return self.report(runtime.version, "applied", None, release=target.release,
                           payload="spare", received_bytes=0)  # fmt: skip

    def _url(self, offer: UpdateOffer) -> str | None:
        """The offer's URL where this device fetches URLs and it names an allowed host.
        The offer is not signed: a URL elsewhere would have the device GET whatever host
        an attacker names, so it is ignored and the chunks come over MQTT."""
        if not offer.url or not self.settings.fetch_urls:
            return None
        url = allowed_url(offer.url, self.settings.url_hosts)
        if url is None:
            log.warning("offer's URL ignored: its host is not in fetch_url_hosts")
        return url

    def _refused(
        self, offer: UpdateOffer, wanted: str, download: Download | None, exc: Exception
    ) -> UpdateStatus | None:
        if download is not None and (download.cancelled or isinstance(exc, TransferCancelled)):
            log.info("download of %s superseded by a newer release", download.target)
            return None
        if (
            isinstance(exc, UpdateRefused)
            and exc.reason == "rollback_attack"
            and offer.release == self.last_release()
        ):
            # The release this device already trusts, under an older timestamp: an offer
            # redelivered after the beat re-signed the timestamp. Refused all the same, but
            # no alarm: reported, it would read as a failed install and abort a rollout.
            log.info("stale offer of release %d (older timestamp) dropped", offer.release)
            return None
        if isinstance(exc, UpdateRefused):
            reason = exc.reason if exc.reason in UPDATE_REASONS else "internal_error"
        else:
            log.error("update to %s failed", wanted, exc_info=exc)
            reason = "internal_error"
        if download is not None and reason in ("bad_hash", "endless_data"):
            download.discard()  # what it holds is wrong: a later try starts afresh
        status = "failed" if reason in _FAILURES else "rejected"
        log.warning("update to %s %s (%s): %s", wanted, status, reason, exc)
        return self.report(wanted, status, reason, release=offer.release)

    def _install(self, target: Target, data: bytes, **extra: Any) -> UpdateStatus:
        """Put a verified package in the spare slot, smoke-check it, swap. ``extra``: how
        it arrived, for the report."""
        try:
            with self._slots_lock:
                runtime = self.slots.install(data, expected_sha256=target.sha256)
                self.swap(runtime)
        except PackageError as exc:
            return self._install_failed(target, exc, **extra)
        except Exception:  # noqa: BLE001 - the device's fault (a full disk), not the release's
            log.exception("model %s not installed", target.version)
            return self.report(target.version, "failed", "internal_error",
                               release=target.release, **extra)  # fmt: skip
        log.info("model %s live (release %d)", runtime.version, target.release)
        return self.report(runtime.version, "applied", None, release=target.release, **extra)

    def _install_failed(self, target: Target, exc: PackageError, **extra: Any) -> UpdateStatus:
        status, reason = _INSTALL_OUTCOMES.get(exc.reason, ("rejected", "corrupt_package"))
        log.warning("model %s not installed (%s): %s", target.version, reason, exc)
        return self.report(target.version, status, reason, release=target.release, **extra)


def _version_of(target: str) -> str:
    """The version a target path names ("{profile}/{version}.edgepkg"), for a report made
    before the signed metadata says it."""
    name = target.rsplit("/", 1)[-1].removesuffix(".edgepkg")
    return name[:64] or "unknown"


def transfer_length(*, offered: int, signed: int, chunk_size: int) -> int:
    """How many bytes to fetch: what the offer says, but never more than one whole chunk
    past the signed length, so a target longer than signed shows TUF its excess
    (``endless_data``) at the cost of a chunk, and a device never downloads without bound.
    (Whole chunks: the cloud cuts a longer object into full ones.)"""
    cap = (-(-signed // chunk_size) + 1) * chunk_size
    return max(1, min(offered, cap))


class LatestOffer:
    """A one-place mailbox between paho's thread and the updater: a newer offer (a higher
    release) replaces one still waiting; an older one is dropped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._offer: UpdateOffer | None = None

    def put(self, offer: UpdateOffer) -> bool:
        with self._cond:
            if self._offer is not None and offer.release < self._offer.release:
                return False
            self._offer = offer
            self._cond.notify()
            return True

    def take(self, timeout: float) -> UpdateOffer | None:
        with self._cond:
            if self._offer is None:
                self._cond.wait(timeout)
            offer, self._offer = self._offer, None
            return offer
