"""The device's delta path: which signed delta applies to the live package, its download,
and the target rebuilt from it into the spare slot. A refused delta is remembered (by its
sha256, for the life of the process) and the caller takes the package: a bad delta costs
bytes once, never the update."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.runtime import ModelRuntime
from edge_agent.transfer import Download, TransferCancelled, Transfers
from edge_agent.updater import ModelSlots
from shared.delta import DeltaError
from shared.errors import PackageError
from shared.messages import UpdateOffer, UpdateStatus
from shared.trust import DeviceTrust, Target, UpdateRefused

log = logging.getLogger(__name__)
# Refusals of the delta's own bytes (or their transfer): the package is taken instead.
DELTA_FAULTS = ("bad_hash", "endless_data", "transfer_failed")


@dataclass(frozen=True)
class Refused:
    """A delta this device will not use; the package comes instead."""

    reason: str  # "delta_" + an UPDATE_REASONS entry, or a DeltaError's reason
    received: int  # the delta's bytes that arrived before it was refused


class DeltaPath:
    """``pick`` the delta for the live package, ``take`` it. ``begin(offer, target)`` starts
    a download; ``report`` and ``install_failed`` are the updater's reports."""

    def __init__(
        self,
        *,
        enabled: bool,
        trust: Callable[[], DeviceTrust],
        transfers: Transfers,
        slots: ModelSlots,
        slots_lock: threading.Lock,
        swap: Callable[[ModelRuntime], None],
        begin: Callable[[UpdateOffer, Target], Download],
        report: Callable[..., UpdateStatus],
        install_failed: Callable[..., UpdateStatus],
    ) -> None:
        self.enabled, self.trust, self.transfers = enabled, trust, transfers
        self.slots, self.slots_lock, self.swap = slots, slots_lock, swap
        self.begin, self.report, self.install_failed = begin, report, install_failed
        self.refused: dict[str, str] = {}  # delta sha256 → why: not tried again

    def pick(self, target: Target, runtime: ModelRuntime | None) -> Target | None:
        """The signed delta to ``target`` whose base is the live package (a delta for
        another base is never used: its result could not be the signed package)."""
        if not self.enabled or runtime is None:
            return None
        for delta in target.deltas:
            if delta.base != runtime.package.sha256 or delta.length >= target.length:
                continue
            if delta.sha256 in self.refused:
                log.info("delta to %s refused before (%s): taking the package",
                         target.version, self.refused[delta.sha256])  # fmt: skip
                return None
            return delta
        if target.deltas:
            log.info("no signed delta to %s applies to the live package", target.version)
        return None

    def take(
        self, offer: UpdateOffer, target: Target, delta: Target
    ) -> UpdateStatus | Refused | None:
        """Download ``delta`` (TUF checks its signed length and hash), rebuild the target
        from the live package into the spare slot and swap. The report when installed, or
        when the rebuilt package fails as a package would; None when superseded by a newer
        offer; Refused when the delta cannot be used."""
        download: Download | None = None
        try:
            download = self.begin(offer, delta)
            data = self.trust().download(delta, offer.metadata, download.chunks)
            download.discard()
        except TransferCancelled:
            return None
        except UpdateRefused as exc:
            if download is not None and download.cancelled:
                return None
            if exc.reason not in DELTA_FAULTS:
                raise  # the release's metadata, not this delta: reported as any update's
            received = sum(download.held.values()) if download is not None else 0
            if download is not None:
                download.discard()  # not resumed: the package comes instead
            return self._refuse(target, delta, f"delta_{exc.reason}", received, exc)
        finally:
            if download is not None:
                self.transfers.end(download)
        extra: dict[str, Any] = {"payload": "delta", "received_bytes": len(data)}
        try:
            with self.slots_lock:
                runtime = self.slots.install_delta(
                    data, base_sha256=str(delta.base), expected_sha256=target.sha256,
                    max_bytes=target.length,
                )  # fmt: skip
                self.swap(runtime)
        except DeltaError as exc:
            return self._refuse(target, delta, exc.reason, len(data), exc)
        except PackageError as exc:
            return self.install_failed(target, exc, **extra)
        except Exception:  # noqa: BLE001 - the device's fault (a full disk), not the release's
            log.exception("model %s not installed from its delta", target.version)
            return self.report(target.version, "failed", "internal_error",
                               release=target.release, **extra)  # fmt: skip
        log.info("model %s live from a %d-byte delta (release %d)", runtime.version, len(data),
                 target.release)  # fmt: skip
        return self.report(runtime.version, "applied", None, release=target.release, **extra)

    def _refuse(
        self, target: Target, delta: Target, reason: str, received: int, exc: Exception
    ) -> Refused:
        self.refused[delta.sha256] = reason
        log.warning("delta to %s refused (%s): %s; taking the package", target.version, reason,
                    exc)  # fmt: skip
        return Refused(reason, received)
