"""A fleet's TUF repository: its keys, its signed metadata in the object store, its releases.

``root`` and ``targets`` keys are offline (``offline_dir/<fleet>/``, loaded only by the
operator's ``init_fleet_trust`` and ``rotate_root``); ``targets`` delegates every target
path to ``releases``, whose key the rollout worker holds beside the ``snapshot`` and
``timestamp`` keys (``keys_dir/<fleet>/``). The version of ``releases`` is the fleet's
release counter. Metadata lives under ``tuf/<fleet>/`` with consistent-snapshot names and
one mutable ``timestamp.json``, written last: a reader that follows the timestamp always
assembles one whole state, even while a publish is writing the next. See docs/updates.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cloud.store.objects import ObjectStore
from shared.errors import EdgeloopError

RELEASES = "releases"
ONLINE_ROLES = (RELEASES, "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")
# TUF matches a path pattern segment by segment: these delegate paths of 1-3 segments.
RELEASE_PATHS = ["*", "*/*", "*/*/*"]
CUSTOM = "edgeloop"  # the key of our custom fields in a target entry

_JSON = JSONSerializer(compact=True)
_ROOT_NAME = re.compile(r"^(\d+)\.root\.json$")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SigningError(EdgeloopError):
    reason = "signing_failed"  # the fleet's repository cannot do what was asked


@dataclass(frozen=True)
class Assignment:
    """One target of a release: a package (or delta) and the devices it is assigned to."""

    path: str  # f"{profile}/{version}.edgepkg"
    sha256: str
    length: int
    fleet: str
    profile: str
    version: str
    devices: tuple[str, ...]  # sorted
    kind: str = "package"  # or "delta", signed beside the package of the same version
    base: str | None = None  # a delta's: the sha256 of the package it applies to


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata is valid once signed."""

    root: timedelta = timedelta(days=365)  # offline: renewed by rotate_root
    targets: timedelta = timedelta(days=365)  # offline: renewed by rotate_root
    releases: timedelta = timedelta(days=365)  # renewed by every publish
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=1)  # the freeze window; a beat task re-signs it


def _now() -> datetime:
    return datetime.now(UTC)


def _write_key(directory: Path, role: str, signer: CryptoSigner) -> Path:
    """A private key as PKCS#8 PEM, readable by its owner only, named by role and keyid."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{role}-{signer.public_key.keyid}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signer.private_bytes)
    return path


def _signers(directory: Path, role: str, delegator: Root | Targets) -> list[Signer]:
    """The signers of ``role`` whose keys are in ``directory``, at least its threshold."""
    entry = delegator.get_delegated_role(role)
    signers: list[Signer] = []
    for keyid in entry.keyids:
        path = (directory / f"{role}-{keyid}.pem").resolve()
        if path.is_file():
            # The public key comes from the signed metadata, so a key file that does not
            # match what devices trust fails here (KeyMismatchError), not on the device.
            signers.append(Signer.from_priv_key_uri(f"file2:{path}", delegator.get_key(keyid)))
    if len(signers) < entry.threshold:
        raise SigningError(
            f"{role} needs {entry.threshold} key(s) of {entry.keyids}; "
            f"{len(signers)} found in {directory}",
            reason="key_missing",
        )
    return signers


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


class _Repo:
    """One fleet's metadata in the object store, and the online signing steps."""

    def __init__(
        self, store: ObjectStore, fleet: str, keys_dir: Path, expiries: Expiries = Expiries()
    ) -> None:
        self.store, self.fleet, self.expiries = store, fleet, expiries
        self.keys = keys_dir / fleet

    def key(self, name: str) -> str:
        return f"tuf/{self.fleet}/{name}"

    def raw(self, name: str) -> bytes:
        return self.store.get(self.key(name))

    def load(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes(self.raw(name))

    def write(self, name: str, md: Metadata[Any]) -> None:
        self.store.put(self.key(name), md.to_bytes(_JSON))

    def root_versions(self) -> list[int]:
        names = (k.rsplit("/", 1)[-1] for k in self.store.list(self.key("")))
        return sorted(int(m.group(1)) for n in names if (m := _ROOT_NAME.match(n)))

    def require(self) -> int:
        versions = self.root_versions()
        if not versions:
            raise SigningError(f"fleet {self.fleet!r} has no TUF root yet", reason="no_trust")
        return versions[-1]

    def names(self) -> dict[str, str]:
        """The current state's file names by role, followed from the timestamp."""
        timestamp = self.load("timestamp.json").signed
        names = {"root": f"{self.require()}.root.json", "timestamp": "timestamp.json"}
        names["snapshot"] = f"{timestamp.snapshot_meta.version}.snapshot.json"
        snapshot = self.load(names["snapshot"]).signed
        for role in ("targets", RELEASES):
            names[role] = f"{snapshot.meta[f'{role}.json'].version}.{role}.json"
        return names

    def state(self) -> dict[str, Metadata[Any]]:
        return {role: self.load(name) for role, name in self.names().items()}

    def sign_release(self, state: dict[str, Metadata[Any]], targets: dict[str, TargetFile]) -> int:
        releases = state[RELEASES]
        releases.signed.version += 1
        releases.signed.expires = _now() + self.expiries.releases
        releases.signed.targets = targets
        _sign(releases, _signers(self.keys, RELEASES, state["targets"].signed))
        self.write(f"{releases.signed.version}.{RELEASES}.json", releases)
        self.advance(state, changed=[RELEASES])
        return releases.signed.version

    def advance(self, state: dict[str, Metadata[Any]], *, changed: Sequence[str]) -> None:
        """A new snapshot naming the ``changed`` roles' versions, then a new timestamp."""
        snapshot = state["snapshot"]
        snapshot.signed.version += 1
        snapshot.signed.expires = _now() + self.expiries.snapshot
        for role in changed:
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=state[role].signed.version)
        _sign(snapshot, _signers(self.keys, "snapshot", state["root"].signed))
        self.write(f"{snapshot.signed.version}.snapshot.json", snapshot)
        self.new_timestamp(state)

    def new_timestamp(self, state: dict[str, Metadata[Any]]) -> None:
        timestamp = state["timestamp"]
        timestamp.signed.version += 1
        timestamp.signed.expires = _now() + self.expiries.timestamp
        timestamp.signed.snapshot_meta = MetaFile(version=state["snapshot"].signed.version)
        _sign(timestamp, _signers(self.keys, "timestamp", state["root"].signed))
        # Written last: until it lands, readers follow the previous, complete state.
        self.write("timestamp.json", timestamp)


def init_fleet_trust(
    *,
    store: ObjectStore,
    fleet: str,
    keys_dir: Path,
    offline_dir: Path,
    expiries: Expiries = Expiries(),
) -> bytes:
    """Create the fleet's keys and its first metadata (an empty release 1); returns the
    root metadata devices are enrolled with. Refuses a fleet that already has a root."""
    repo, e = _Repo(store, fleet, keys_dir), expiries
    if repo.root_versions():
        raise SigningError(f"fleet {fleet!r} already has a TUF root", reason="trust_exists")
    now = _now()
    keys = {role: CryptoSigner.generate_ed25519() for role in OFFLINE_ROLES + ONLINE_ROLES}
    for role, signer in keys.items():
        _write_key((offline_dir if role in OFFLINE_ROLES else keys_dir) / fleet, role, signer)

    root = Root(expires=now + e.root, consistent_snapshot=True)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(keys[role].public_key, role)
    delegation = DelegatedRole(RELEASES, [], 1, terminating=True, paths=RELEASE_PATHS)
    targets = Targets(
        expires=now + e.targets, delegations=Delegations(keys={}, roles={RELEASES: delegation})
    )
    targets.add_key(keys[RELEASES].public_key, RELEASES)
    releases = Targets(expires=now + e.releases)
    snapshot = Snapshot(
        expires=now + e.snapshot,
        meta={"targets.json": MetaFile(version=1), f"{RELEASES}.json": MetaFile(version=1)},
    )
    timestamp = Timestamp(expires=now + e.timestamp, snapshot_meta=MetaFile(version=1))

    signed: list[tuple[str, Metadata[Any], str]] = [
        (f"1.{RELEASES}.json", Metadata(releases), RELEASES),
        ("1.targets.json", Metadata(targets), "targets"),
        ("1.snapshot.json", Metadata(snapshot), "snapshot"),
        ("timestamp.json", Metadata(timestamp), "timestamp"),
        ("1.root.json", Metadata(root), "root"),  # last: its presence means "has trust"
    ]
    for name, md, role in signed:
        _sign(md, [keys[role]])
        repo.write(name, md)
    return repo.raw("1.root.json")


def root_metadata(*, store: ObjectStore, fleet: str) -> bytes:
    """The fleet's newest root (what a device is enrolled with)."""
    repo = _Repo(store, fleet, Path())
    return repo.raw(f"{repo.require()}.root.json")


def rotate_root(
    *,
    store: ObjectStore,
    fleet: str,
    offline_dir: Path,
    keys_dir: Path,
    online: bool = False,
    targets: bool = False,
    new_root_key: CryptoSigner | None = None,
    expiries: Expiries = Expiries(),
) -> int:
    """Root N+1 with a new root key, signed by the old and new root keys; with ``online``
    also new releases, snapshot and timestamp keys, with ``targets`` a new targets key (the
    recovery for a lost or stolen one). Targets is re-signed (renewed expiry), the release
    at its version (same content: the counter does not move), then snapshot and timestamp.
    Returns the new root version."""
    repo = _Repo(store, fleet, keys_dir, expiries)
    state = repo.state()
    roles = ["root", *(["targets"] if targets else []), *(ONLINE_ROLES if online else [])]
    fresh = {role: CryptoSigner.generate_ed25519() for role in roles}
    fresh["root"] = new_root_key or fresh["root"]
    # Loaded before anything is written: a missing offline key changes nothing.
    offline, old_root = offline_dir / fleet, state["root"].signed
    old_root_signers = _signers(offline, "root", old_root)
    targets_signers: list[Signer] = (
        [fresh["targets"]] if targets else _signers(offline, "targets", old_root)
    )

    root = Metadata[Root].from_bytes(state["root"].to_bytes(_JSON))
    retired: list[Path] = []
    for role, signer in fresh.items():
        delegator = state["targets"].signed if role == RELEASES else root.signed
        for keyid in list(delegator.get_delegated_role(role).keyids):
            delegator.revoke_key(keyid, role)
            if role in ONLINE_ROLES:
                retired.append(keys_dir / fleet / f"{role}-{keyid}.pem")
        delegator.add_key(signer.public_key, role)
        _write_key((offline_dir if role in OFFLINE_ROLES else keys_dir) / fleet, role, signer)
    root.signed.version += 1
    root.signed.expires = _now() + expiries.root
    # Old root's threshold (devices verify N+1 with N) and the new one's (N+1 verifies itself).
    _sign(root, [*old_root_signers, fresh["root"]])
    repo.write(f"{root.signed.version}.root.json", root)
    state["root"] = root
    if online:
        _sign(state[RELEASES], [fresh[RELEASES]])
        repo.write(f"{state[RELEASES].signed.version}.{RELEASES}.json", state[RELEASES])
    state["targets"].signed.version += 1
    state["targets"].signed.expires = _now() + expiries.targets
    _sign(state["targets"], targets_signers)
    repo.write(f"{state['targets'].signed.version}.targets.json", state["targets"])
    repo.advance(state, changed=["targets"])
    for path in retired:  # a replaced online key is of no use, and a danger if stolen
        path.unlink(missing_ok=True)
    return root.signed.version


def _target_file(a: Assignment) -> TargetFile:
    custom = {k: v for k, v in asdict(a).items() if k not in ("path", "sha256", "length")}
    return TargetFile(a.length, {"sha256": a.sha256}, a.path, {"custom": {CUSTOM: custom}})


def _assignments(releases: Targets) -> list[Assignment]:
    """A release's targets as assignments, by path (what ``_target_file`` wrote)."""
    out = []
    for info in releases.targets.values():
        custom = dict(info.custom[CUSTOM], devices=tuple(sorted(info.custom[CUSTOM]["devices"])))
        out.append(Assignment(info.path, info.hashes["sha256"], info.length, **custom))
    return sorted(out, key=lambda a: a.path)


def _normalise(assignments: Sequence[Assignment]) -> list[Assignment]:
    out = sorted(
        (replace(a, devices=tuple(sorted(set(a.devices)))) for a in assignments),
        key=lambda a: a.path,
    )
    for prev, a in zip([None, *out], out, strict=False):
        if (prev and prev.path == a.path) or a.length <= 0 or not _SHA256.fullmatch(a.sha256):
            raise SigningError(
                f"{a.path}: a second entry, or no length or sha256", reason="bad_release"
            )
    return out


class ReleaseSigner:
    """Signs a fleet's releases with its online keys. Callers serialise ``publish`` and
    ``refresh_timestamp`` per fleet (a row lock): both derive next versions from the store."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        fleet: str,
        keys_dir: Path,
        timestamp_expiry: timedelta = timedelta(days=1),
        releases_expiry: timedelta = timedelta(days=365),
        snapshot_expiry: timedelta = timedelta(days=30),
    ) -> None:
        self.fleet = fleet
        expiries = Expiries(
            releases=releases_expiry, snapshot=snapshot_expiry, timestamp=timestamp_expiry
        )
        self._repo = _Repo(store, fleet, keys_dir, expiries)

    def current_release(self) -> int:
        return int(self._repo.names()[RELEASES].split(".", 1)[0])

    def assignments(self) -> list[Assignment]:
        """The current release's targets, by path."""
        return _assignments(self._repo.load(self._repo.names()[RELEASES]).signed)

    def publish(self, assignments: Sequence[Assignment]) -> int:
        """A new signed release assigning these targets, or none if they are the current
        release's (idempotent). Returns the release number."""
        wanted = _normalise(assignments)
        state = self._repo.state()
        if _assignments(state[RELEASES].signed) == wanted:
            return state[RELEASES].signed.version
        return self._repo.sign_release(state, {a.path: _target_file(a) for a in wanted})

    def offline_expiry(self) -> datetime:
        """When the root or targets metadata expires (whichever first): before then an
        operator runs ``edgeloop fleet rotate-root``, or every device refuses updates."""
        state = self._repo.state()
        return min(state["root"].signed.expires, state["targets"].signed.expires)

    def bundle(self) -> dict[str, str]:
        """File name → JSON text of one consistent state, named as ngclient asks (consistent
        snapshots): every ``N.root.json``, ``timestamp.json``, ``N.<role>.json`` of the rest."""
        names = self._repo.names()
        files = [f"{v}.root.json" for v in self._repo.root_versions()]
        files += [names[role] for role in ("timestamp", "snapshot", "targets", RELEASES)]
        return {name: self._repo.raw(name).decode() for name in files}

    def refresh_timestamp(self, *, within: timedelta) -> bool:
        """Re-sign the timestamp (version+1) if it expires within ``within``; likewise the
        snapshot, and the release (a new number, same assignments: only a fleet that shipped
        nothing for ``releases_expiry`` gets one). True if anything was signed."""
        state = self._repo.state()
        deadline = _now() + within
        if state[RELEASES].signed.expires <= deadline:
            self._repo.sign_release(state, state[RELEASES].signed.targets)
            return True
        if state["snapshot"].signed.expires <= deadline:
            self._repo.advance(state, changed=[])
            return True
        if state["timestamp"].signed.expires <= deadline:
            self._repo.new_timestamp(state)
            return True
        return False
