"""Model slots on the device: verify an update, build it in the spare slot, swap atomically.

Two slots, ``a`` and ``b``, each holding one package file, and a pointer file ``current``
that names the live slot. Every write goes to a temp file, is fsynced and renamed, and the
pointer flips last; a power cut between any two steps leaves a pointer to a slot that
verified and passed its smoke check. At start-up a live slot that fails verification
falls back to the other one.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from edge_agent.runtime import ModelRuntime
from shared.delta import DeltaError
from shared.delta import apply as apply_delta
from shared.errors import PackageError
from shared.package import ModelPackage

log = logging.getLogger(__name__)
SLOTS = ("a", "b")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


class ModelSlots:
    def __init__(self, root: Path, *, profile: str, threads: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.threads = threads
        self.pointer = self.root / "current"

    def _slot_path(self, slot: str) -> Path:
        return self.root / f"slot-{slot}.pkg"

    def live_slot(self) -> str | None:
        try:
            slot = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return slot if slot in SLOTS else None

    def _load(self, slot: str) -> ModelRuntime:
        pkg = ModelPackage.from_path(self._slot_path(slot))
        self._check_profile(pkg)
        runtime = ModelRuntime(pkg, threads=self.threads)
        runtime.smoke_check()
        return runtime

    def _check_profile(self, pkg: ModelPackage) -> None:
        if pkg.manifest.profile != self.profile:
            raise PackageError(
                f"package is for profile {pkg.manifest.profile!r}, this device "
                f"runs {self.profile!r}",
                reason="wrong_profile",
            )

    def load_active(self) -> ModelRuntime | None:
        """The live model; if its slot is broken, the other slot (and the pointer follows)."""
        live = self.live_slot()
        order = [live, *(s for s in SLOTS if s != live)] if live else []
        for slot in order:
            try:
                runtime = self._load(slot)
            except (PackageError, FileNotFoundError) as exc:
                log.warning("slot %s unusable: %s", slot, exc)
                continue
            if slot != live:
                log.warning("falling back to slot %s", slot)
                _write_atomic(self.pointer, slot.encode())
            return runtime
        return None

    def install(self, data: bytes, *, expected_sha256: str | None = None) -> ModelRuntime:
        """Verify ``data``, put it in the spare slot, smoke-check it, then flip the pointer.

        Raises PackageError with a reason; on any failure the live slot is untouched.
        """
        pkg = ModelPackage(data, expected_sha256=expected_sha256)
        self._check_profile(pkg)
        live = self.live_slot()
        spare = "b" if live == "a" else "a"
        path = self._slot_path(spare)
        _write_atomic(path, data)
        runtime = self._load(spare)  # re-read from disk: what runs is what was stored
        if runtime.package.sha256 != pkg.sha256:
            raise PackageError("slot content changed while installing", reason="sha_mismatch")
        _write_atomic(self.pointer, spare.encode())
        log.info("model %s live in slot %s", pkg.version, spare)
        return runtime

    def install_delta(
        self, delta: bytes, *, base_sha256: str, expected_sha256: str, max_bytes: int
    ) -> ModelRuntime:
        """Rebuild a package from the live slot's and ``delta`` into the spare slot (streamed:
        about one tensor in memory), smoke-check it, then flip the pointer. DeltaError when
        the delta is not for the live package, claims more than ``max_bytes`` (the signed
        length), or does not rebuild ``expected_sha256``; nothing is written before its
        header is checked, and on any failure the live slot is untouched."""
        live = self.live_slot()
        if live is None:
            raise DeltaError("no live model to apply a delta to", reason="delta_base_mismatch")
        spare = "b" if live == "a" else "a"
        path = self._slot_path(spare)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(self._slot_path(live), "rb") as base, open(tmp, "wb") as out:
                apply_delta(
                    base=base,
                    delta=io.BytesIO(delta),
                    out=out,
                    max_target_bytes=max_bytes,
                    expected_base_sha256=base_sha256,
                    expected_target_sha256=expected_sha256,
                    delta_length=len(delta),
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        runtime = self._load(spare)  # re-read from disk: what runs is what was stored
        if runtime.package.sha256 != expected_sha256:
            raise PackageError("slot content changed while installing", reason="sha_mismatch")
        _write_atomic(self.pointer, spare.encode())
        log.info("model %s live in slot %s (from a delta)", runtime.version, spare)
        return runtime

    def activate_spare(self, sha256: str) -> ModelRuntime | None:
        """Make the spare slot live if it holds exactly the package ``sha256`` names (a
        model this device ran before: going back to it needs no download), smoke-checked
        again; None, with nothing changed, if it holds anything else or fails its check."""
        live = self.live_slot()
        if live is None:
            return None
        spare = "b" if live == "a" else "a"
        try:
            ModelPackage.from_path(self._slot_path(spare), expected_sha256=sha256)
            runtime = self._load(spare)
        except (PackageError, FileNotFoundError):
            return None
        _write_atomic(self.pointer, spare.encode())
        log.info("model %s live again from slot %s", runtime.version, spare)
        return runtime

    def rollback(self, *, expected_version: str | None = None) -> ModelRuntime:
        """Make the other slot live again, if it still holds a valid model (and, when
        ``expected_version`` is given, that version); otherwise nothing changes."""
        live = self.live_slot()
        if live is None:
            raise PackageError("no live slot to roll back from", reason="no_previous_model")
        other = "b" if live == "a" else "a"
        try:
            runtime = self._load(other)
        except (PackageError, FileNotFoundError) as exc:
            raise PackageError(
                f"no valid previous model in slot {other}: {exc}", reason="no_previous_model"
            ) from exc
        if expected_version is not None and runtime.version != expected_version:
            raise PackageError(
                f"the previous slot holds {runtime.version}, not {expected_version}",
                reason="no_previous_model",
            )
        _write_atomic(self.pointer, other.encode())
        return runtime
