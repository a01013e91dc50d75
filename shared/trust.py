"""The device's side of signed updates: python-tuf's own client (ngclient) verifies each
offer's metadata and each download, and this module maps what it refuses to our reasons.

The offer carries the repository state (file name → JSON text); a fetcher of ours serves
ngclient's requests from it (absent names are HTTP 404, which is how ngclient learns it has
the newest root) and serves the target's bytes from the transfer. ngclient keeps the
trusted metadata in ``metadata_dir``; it is what refuses an older release later. Every
call works on a scratch copy of that directory and replaces the trusted files only when
it succeeds, so a refused offer leaves the device's trust exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from shared import jsonguard
from shared.errors import PackageError
from shared.messages import MAX_UPDATE_MESSAGE_BYTES, UPDATE_REASONS

RELEASES = "releases"  # the delegated role that holds every target; its version = release
CUSTOM = "edgeloop"  # the key of our custom fields in a target entry
METADATA_URL = "offer:/metadata/"
TARGETS_URL = "offer:/targets/"
_STAGE = ".stage-"
# ngclient's trusted files, in commit order (root.json links into root_history/, so that
# goes first); nothing else in the directory is copied, replaced or cleared.
_TRUSTED = (
    "root_history",
    "root.json",
    "timestamp.json",
    "snapshot.json",
    "targets.json",
    f"{RELEASES}.json",
)


class UpdateRefused(PackageError):
    """The device refuses an update; ``reason`` is one of ``UPDATE_REASONS``."""

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in UPDATE_REASONS:
            raise ValueError(f"{reason!r} is not one of UPDATE_REASONS")
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class Target:
    """A target the current signed release assigns to this device."""

    path: str
    length: int
    sha256: str
    fleet: str
    profile: str
    version: str
    kind: str
    base: str | None
    release: int
    # A package's: the delta targets the release signs for this device to the same version
    # (each applies to the package whose sha256 is its ``base``).
    deltas: tuple[Target, ...] = ()


class _OfferFetcher(FetcherInterface):
    """ngclient's network: metadata from the offer, the target's bytes from the transfer."""

    def __init__(
        self, metadata: Mapping[str, str], chunks: Callable[[], Iterator[bytes]] | None = None
    ) -> None:
        self._metadata = metadata
        self._chunks = chunks

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_URL):
            name = unquote(url.removeprefix(METADATA_URL))
            text = self._metadata.get(name)
            if text is None:
                raise exceptions.DownloadHTTPError(f"the offer carries no {name}", 404)
            return iter((text.encode(),))
        if url.startswith(TARGETS_URL) and self._chunks is not None:
            return self._chunks()
        raise exceptions.DownloadHTTPError(f"nothing is offered at {url}", 404)


def _bounded(metadata: Mapping[str, str]) -> Mapping[str, str]:
    """The offer's metadata, each file checked for size and nesting before ngclient parses
    it (json.loads recurses once per level): a file too deep or too large is not validly
    signed metadata for us, refused as ngclient refuses one that does not parse."""
    for name, text in metadata.items():
        try:
            jsonguard.check(text, max_bytes=MAX_UPDATE_MESSAGE_BYTES)
        except jsonguard.JsonRefused as exc:
            raise UpdateRefused(f"metadata {name} refused: {exc}", reason="bad_signature") from exc
    return metadata


@contextmanager
def _refusals() -> Iterator[None]:
    """ngclient's errors as refusals with our reasons (most specific first)."""
    try:
        yield
    except UpdateRefused:
        raise
    except exceptions.UnsignedMetadataError as exc:
        raise UpdateRefused(f"signature check failed: {exc}", reason="bad_signature") from exc
    except exceptions.BadVersionNumberError as exc:
        raise UpdateRefused(f"older than trusted: {exc}", reason="rollback_attack") from exc
    except exceptions.ExpiredMetadataError as exc:
        raise UpdateRefused(f"expired: {exc}", reason="expired_metadata") from exc
    except exceptions.LengthOrHashMismatchError as exc:
        raise UpdateRefused(f"does not match what is signed: {exc}", reason="bad_hash") from exc
    except exceptions.DownloadLengthMismatchError as exc:
        raise UpdateRefused(f"longer than signed: {exc}", reason="endless_data") from exc
    except exceptions.DownloadHTTPError as exc:
        raise UpdateRefused(str(exc), reason="missing_metadata") from exc
    except exceptions.DownloadError as exc:
        raise UpdateRefused(f"transfer failed: {exc}", reason="transfer_failed") from exc
    except exceptions.RepositoryError as exc:
        # What remains is metadata that does not parse or is not what it claims to be
        # (wrong type, a role missing from the snapshot): not validly signed for us.
        raise UpdateRefused(f"metadata refused: {exc}", reason="bad_signature") from exc


@contextmanager
def _staged(metadata_dir: Path, *, fresh: bool = False) -> Iterator[Path]:
    """A scratch copy of the trusted metadata (empty if ``fresh``) that replaces it only
    if the block succeeds. Each file is replaced atomically; a crash between two leaves a
    mix of files ngclient verified, which it re-checks (and re-fetches) on the next run."""
    stage = Path(tempfile.mkdtemp(prefix=_STAGE, dir=metadata_dir))
    try:
        for name in () if fresh else _TRUSTED:
            src = metadata_dir / name
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, stage / name, symlinks=True)
            elif src.is_symlink() or src.exists():
                shutil.copy2(src, stage / name, follow_symlinks=False)
        yield stage
        if fresh:
            _clear(metadata_dir)
        for name in _TRUSTED:
            staged = stage / name
            if staged.is_dir() and not staged.is_symlink():
                (metadata_dir / name).mkdir(exist_ok=True)
                for path in staged.iterdir():
                    os.replace(path, metadata_dir / name / path.name)
            elif staged.is_symlink() or staged.exists():
                os.replace(staged, metadata_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _clear(metadata_dir: Path) -> None:
    for name in _TRUSTED:
        entry = metadata_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


class DeviceTrust:
    """One device's trust in its fleet's repository (ngclient's cache in ``metadata_dir``)."""

    def __init__(self, metadata_dir: Path, *, fleet: str, device_id: str, profile: str) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.fleet, self.device_id, self.profile = fleet, device_id, profile

    @staticmethod
    def enroll(metadata_dir: Path, root: bytes) -> None:
        """Trust ``root`` (the fleet's root metadata from enrollment) from now on, replacing
        whatever this directory trusted before. A root that does not verify is refused."""
        _bounded({"root.json": root.decode("utf-8", "replace")})
        metadata_dir = Path(metadata_dir)
        metadata_dir.mkdir(parents=True, exist_ok=True)
        with _staged(metadata_dir, fresh=True) as stage, _refusals():
            # Constructing the Updater verifies the root's self-signatures and caches it.
            Updater(str(stage), METADATA_URL, fetcher=_OfferFetcher({}), bootstrap=root)

    def enrolled(self) -> bool:
        return (self.metadata_dir / "root.json").exists()

    def last_release(self) -> int | None:
        """The newest release (``releases`` version) this device has verified."""
        try:
            return self._releases(self.metadata_dir).version
        except (OSError, exceptions.RepositoryError):
            return None

    def resolve(self, metadata: Mapping[str, str], *, offered: str | None = None) -> Target | None:
        """Verify the offer's metadata with ngclient and return the target the current
        release assigns to this device (None if it assigns none). ``offered`` is the
        target the cloud expects: one in the release but not for this device is refused
        (mix_and_match); one not in the release at all is a stale offer and ignored."""
        metadata = _bounded(metadata)
        with _staged(self._require()) as stage, _refusals():
            updater = self._updater(stage, metadata)
            updater.refresh()
            releases = self._walk(updater, stage)
            return self._pick(releases, offered)

    def download(
        self,
        target: Target,
        metadata: Mapping[str, str],
        chunks: Callable[[], Iterator[bytes]],
    ) -> bytes:
        """The target's bytes, fetched from ``chunks()`` by ngclient's ``download_target``,
        which stops at the signed length (endless_data) and checks the signed hashes
        (bad_hash). Errors ``chunks()`` raises itself propagate unchanged."""
        metadata = _bounded(metadata)
        with _staged(self._require()) as stage, _refusals():
            updater = self._updater(stage, metadata, chunks)
            updater.refresh()
            releases = self._walk(updater, stage)
            info = updater.get_targetinfo(target.path)
            mine = self._pick(releases, target.path)
            signed = [] if mine is None else [mine, *mine.deltas]
            if info is None or not any(t.path == target.path and t.sha256 == target.sha256
                                       for t in signed):  # fmt: skip
                raise UpdateRefused(
                    f"{target.path} is not signed for this device as offered",
                    reason="mix_and_match",
                )
            out = stage / ".download"
            updater.download_target(info, filepath=str(out))
            data = out.read_bytes()
            out.unlink()
            return data

    # --- helpers ---------------------------------------------------------------------

    def _require(self) -> Path:
        if not self.enrolled():
            raise UpdateRefused(
                f"{self.metadata_dir} holds no enrolled root", reason="missing_metadata"
            )
        return self.metadata_dir

    def _updater(
        self,
        directory: Path,
        metadata: Mapping[str, str],
        chunks: Callable[[], Iterator[bytes]] | None = None,
    ) -> Updater:
        return Updater(
            str(directory),
            METADATA_URL,
            target_base_url=TARGETS_URL,
            fetcher=_OfferFetcher(metadata, chunks),
            # The fetcher serves the one target whatever its URL: no hash-prefixed names.
            config=UpdaterConfig(prefix_targets_with_hash=False),
            # The cached root.json is our anchor: enrollment wrote it and only roots
            # ngclient verified (a rotation) have replaced it since.
            bootstrap=None,
        )

    def _walk(self, updater: Updater, directory: Path) -> Targets:
        """Have ngclient load (verify, cache) ``releases`` and return it. Looking up any
        path under the delegation does that; a path in this device's profile is one."""
        updater.get_targetinfo(f"{self.profile}/{self.device_id}")
        return self._releases(directory)

    @staticmethod
    def _releases(directory: Path) -> Targets:
        md: Metadata[Targets] = Metadata.from_bytes((directory / f"{RELEASES}.json").read_bytes())
        return md.signed

    def _pick(self, releases: Targets, offered: str | None) -> Target | None:
        """The package the release assigns this device (one at most), with the deltas it
        signs for this device to that package's version."""
        mine = [
            t for t in releases.targets.values() if self.device_id in _custom(t).get("devices", ())
        ]
        if (
            offered is not None
            and offered in releases.targets
            and releases.targets[offered] not in mine
        ):
            raise UpdateRefused(
                f"release {releases.version} assigns {offered} to other devices",
                reason="mix_and_match",
            )
        packages = [t for t in mine if _custom(t).get("kind", "package") == "package"]
        if not packages:
            return None
        if len(packages) > 1:
            raise UpdateRefused(
                f"release {releases.version} assigns {len(packages)} packages to {self.device_id}",
                reason="mix_and_match",
            )
        package = self._check(packages[0], releases.version)
        deltas = tuple(
            self._check(t, releases.version)
            for t in mine
            if _custom(t).get("kind") == "delta" and _custom(t).get("version") == package.version
        )
        return replace(package, deltas=deltas)

    def _check(self, info: TargetFile, release: int) -> Target:
        c = _custom(info)
        fleet, profile = c.get("fleet"), c.get("profile")
        if fleet != self.fleet or profile != self.profile or info.path.split("/")[0] != profile:
            raise UpdateRefused(
                f"{info.path} is signed for fleet {fleet!r} profile {profile!r}; this device "
                f"is {self.fleet!r} / {self.profile!r}",
                reason="mix_and_match",
            )
        sha256 = info.hashes.get("sha256")
        if not sha256:
            raise UpdateRefused(f"{info.path} is signed without a sha256", reason="bad_hash")
        return Target(
            path=info.path,
            length=info.length,
            sha256=sha256,
            fleet=fleet,
            profile=profile,
            version=str(c.get("version", "")),
            kind=str(c.get("kind", "package")),
            base=c.get("base"),
            release=release,
        )


def _custom(info: TargetFile) -> dict[str, Any]:
    custom = info.custom
    fields = custom.get(CUSTOM) if isinstance(custom, dict) else None
    return fields if isinstance(fields, dict) else {}
