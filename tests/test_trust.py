"""Signed updates end to end at the library level: the fleet's TUF repository
(cloud.rollout.signing) and a device's ngclient (shared.trust), with real keys, real
metadata and real package bytes; each attack refused with its named reason."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from cloud.rollout.signing import (
    Assignment,
    ReleaseSigner,
    SigningError,
    init_fleet_trust,
    root_metadata,
    rotate_root,
)
from cloud.store.objects import LocalObjectStore, ObjectStore
from shared.trust import DeviceTrust, Target, UpdateRefused
from tests.conftest import repackage, unique

PROFILE = "cpu-fp32"


@dataclass
class Repo:
    store: ObjectStore
    fleet: str
    keys: Path
    offline: Path
    root: bytes

    def signer(self, **kw) -> ReleaseSigner:
        return ReleaseSigner(store=self.store, fleet=self.fleet, keys_dir=self.keys, **kw)


def make_repo(store: ObjectStore, tmp_path: Path, fleet: str | None = None) -> Repo:
    fleet = fleet or unique("f")
    keys, offline = tmp_path / "keys", tmp_path / "offline"
    root = init_fleet_trust(store=store, fleet=fleet, keys_dir=keys, offline_dir=offline)
    return Repo(store, fleet, keys, offline, root)


def assignment(repo: Repo, pkg: bytes, version: str, devices, **fields) -> Assignment:
    profile = fields.pop("profile", PROFILE)
    return Assignment(
        path=f"{profile}/{version}.edgepkg",
        sha256=hashlib.sha256(pkg).hexdigest(),
        length=len(pkg),
        fleet=fields.pop("fleet", repo.fleet),
        profile=profile,
        version=version,
        devices=tuple(devices),
        **fields,
    )


def enrolled(repo: Repo, tmp_path: Path, device_id: str = "d1") -> DeviceTrust:
    directory = tmp_path / "devices" / device_id
    DeviceTrust.enroll(directory, repo.root)
    return DeviceTrust(directory, fleet=repo.fleet, device_id=device_id, profile=PROFILE)


def trusted_state(device: DeviceTrust) -> dict[str, bytes | str]:
    """Every file ngclient trusts, as bytes (the root.json link as its target)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(device.metadata_dir.rglob("*")):
        rel = path.relative_to(device.metadata_dir).as_posix()
        if path.is_symlink():
            out[rel] = os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def resolved(device: DeviceTrust, bundle: dict[str, str], offered: str | None = None) -> Target:
    """The device's target in the bundle's release (which must assign it one)."""
    target = device.resolve(bundle, offered=offered)
    assert target is not None
    return target


def chunks_of(data: bytes, size: int = 4096):
    return lambda: (data[i : i + size] for i in range(0, len(data), size))


@pytest.fixture
def repo(tmp_path):
    return make_repo(LocalObjectStore(tmp_path / "objects"), tmp_path)


@pytest.fixture
def pkg(tiny_package):
    return tiny_package[0]


def test_a_release_assigned_to_the_device_resolves_and_downloads(repo, tmp_path, pkg):
    """The device finds its target in the signed release and ngclient downloads its bytes."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    release = signer.publish([assignment(repo, pkg, "v1", ["d1", "d2"])])
    bundle = signer.bundle()

    # Execute
    target = resolved(device, bundle, offered=f"{PROFILE}/v1.edgepkg")
    data = device.download(target, bundle, chunks_of(pkg))

    # Assert
    assert release == 2 and target.release == 2 and device.last_release() == 2
    assert (target.fleet, target.profile, target.version, target.kind) == (
        repo.fleet,
        PROFILE,
        "v1",
        "package",
    )
    assert data == pkg and target.sha256 == hashlib.sha256(pkg).hexdigest()
    assert sum(len(text) for text in bundle.values()) < 16_000  # one MQTT message


def test_a_device_with_no_target_in_the_release_resolves_none(repo, tmp_path, pkg):
    """A release that assigns this device nothing is trusted and yields no target."""
    # Prepare
    device = enrolled(repo, tmp_path, "d9")
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])

    # Execute
    target = device.resolve(signer.bundle())

    # Assert
    assert target is None and device.last_release() == 2


def _tamper_releases(bundle: dict[str, str]) -> dict[str, str]:
    name = next(n for n in bundle if n.endswith(".releases.json"))
    md = json.loads(bundle[name])
    for entry in md["signed"]["targets"].values():
        entry["custom"]["edgeloop"]["devices"].append("d1")
    return {**bundle, name: json.dumps(md)}


def _unsign_timestamp(bundle: dict[str, str]) -> dict[str, str]:
    md = json.loads(bundle["timestamp.json"])
    md["signatures"] = []
    return {**bundle, "timestamp.json": json.dumps(md)}


@pytest.mark.parametrize("tamper", [_tamper_releases, _unsign_timestamp])
def test_tampered_or_unsigned_metadata_is_refused(repo, tmp_path, pkg, tamper):
    """Metadata changed after signing, or stripped of its signatures: bad_signature."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    device.resolve(signer.bundle())
    signer.publish([assignment(repo, pkg, "v1", ["d2"])])
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(tamper(signer.bundle()))

    # Assert
    assert refused.value.reason == "bad_signature"
    assert trusted_state(device) == before and device.last_release() == 2


def test_metadata_signed_by_another_fleets_keys_is_refused(repo, tmp_path, pkg):
    """A whole, validly signed repository of another fleet is not this device's: bad_signature."""
    # Prepare
    device = enrolled(repo, tmp_path)
    other = make_repo(repo.store, tmp_path)
    other_signer = other.signer()
    other_signer.publish([assignment(other, pkg, "v1", ["d1"], fleet=repo.fleet)])
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(other_signer.bundle())

    # Assert
    assert refused.value.reason == "bad_signature"
    assert trusted_state(device) == before and device.last_release() is None


def test_an_older_bundle_replayed_after_a_newer_one_is_refused(repo, tmp_path, pkg):
    """Once release 3 is trusted, release 2's metadata is a rollback attack."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    old = signer.bundle()
    signer.publish([assignment(repo, pkg, "v1", ["d1", "d2"])])
    device.resolve(signer.bundle())
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(old)

    # Assert
    assert refused.value.reason == "rollback_attack"
    assert trusted_state(device) == before and device.last_release() == 3


def test_an_expired_timestamp_is_refused(repo, tmp_path, pkg):
    """A timestamp past its expiry by the device's clock (a freeze): expired_metadata."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    device.resolve(signer.bundle())
    short = repo.signer(timestamp_expiry=timedelta(seconds=1))
    short.publish([assignment(repo, pkg, "v1", ["d1", "d2"])])
    time.sleep(1.2)  # expiry is signed to the second
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(short.bundle())

    # Assert
    assert refused.value.reason == "expired_metadata"
    assert trusted_state(device) == before and device.last_release() == 2


def test_a_bundle_lacking_the_releases_metadata_is_refused(repo, tmp_path, pkg):
    """The snapshot names a release the offer does not carry: missing_metadata."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    bundle = {n: t for n, t in signer.bundle().items() if not n.endswith(".releases.json")}
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(bundle)

    # Assert
    assert refused.value.reason == "missing_metadata"
    assert trusted_state(device) == before and device.last_release() is None


@pytest.mark.parametrize(
    ("assigned", "offered"),
    [
        ({"profile": "jetson-fp16", "devices": ["d1"]}, None),  # another profile
        ({"devices": ["d2"]}, f"{PROFILE}/v2.edgepkg"),  # another device
        ({"fleet": "someone-else", "devices": ["d1"]}, None),  # another fleet's fields
    ],
    ids=["profile", "device", "fleet"],
)
def test_a_target_for_another_profile_device_or_fleet_is_refused(
    repo, tmp_path, pkg, assigned, offered
):
    """Signed, but not for this device: mix_and_match, and nothing of it is trusted."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    devices = assigned.pop("devices")
    signer.publish([assignment(repo, pkg, "v2", devices, **assigned)])
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(signer.bundle(), offered=offered)

    # Assert
    assert refused.value.reason == "mix_and_match"
    assert trusted_state(device) == before and device.last_release() is None


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda data: data + b"\0" * 10, "endless_data"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "bad_hash"),
        (lambda data: data[:-100], "bad_hash"),
    ],
    ids=["longer", "flipped", "shorter"],
)
def test_a_download_that_is_not_the_signed_target_is_refused(repo, tmp_path, pkg, mangle, reason):
    """ngclient's own length and hash checks: longer than signed, or other bytes."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    bundle = signer.bundle()
    target = resolved(device, bundle)
    before = trusted_state(device)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        device.download(target, bundle, chunks_of(mangle(pkg)))

    # Assert
    assert refused.value.reason == reason
    assert trusted_state(device) == before


def test_a_release_moving_a_device_back_to_an_older_model_installs(repo, tmp_path, tiny_package):
    """Anti-rollback guards the release counter, not the model: release 3 naming v1 installs."""
    # Prepare
    v1, v2 = tiny_package[0], repackage(tiny_package, "v2")
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, v2, "v2", ["d1"])])
    first = resolved(device, signer.bundle())
    assert device.download(first, signer.bundle(), chunks_of(v2)) == v2
    signer.publish([assignment(repo, v1, "v1", ["d1"])])

    # Execute
    back = resolved(device, signer.bundle(), offered=f"{PROFILE}/v1.edgepkg")
    data = device.download(back, signer.bundle(), chunks_of(v1))

    # Assert
    assert (first.version, first.release) == ("v2", 2)
    assert (back.version, back.release) == ("v1", 3)
    assert data == v1 and device.last_release() == 3


def test_rotated_root_keys_are_accepted_without_re_enrolling(repo, tmp_path, pkg):
    """A device enrolled with root v1 follows two rotations (the second replacing every
    other key too) and refuses what the retired keys sign."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    device.resolve(signer.bundle())
    old_keys_bundle = signer.bundle()

    # Execute
    kw = {"store": repo.store, "fleet": repo.fleet, "offline_dir": repo.offline}
    assert rotate_root(**kw, keys_dir=repo.keys) == 2
    assert rotate_root(**kw, keys_dir=repo.keys, online=True, targets=True) == 3
    same = resolved(device, signer.bundle())  # release 2, re-signed by the new key
    signer.publish([assignment(repo, pkg, "v1", ["d1", "d2"])])
    target = device.resolve(signer.bundle())

    # Assert
    assert same.release == 2 and target is not None and target.release == 3
    assert sorted(os.listdir(device.metadata_dir / "root_history")) == [
        "1.root.json",
        "2.root.json",
        "3.root.json",
    ]
    assert root_metadata(store=repo.store, fleet=repo.fleet) == repo.store.get(
        f"tuf/{repo.fleet}/3.root.json"
    )
    assert len(list((repo.keys / repo.fleet).glob("*.pem"))) == 3  # retired keys deleted
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(old_keys_bundle)
    assert refused.value.reason == "bad_signature"


def test_refresh_timestamp_re_signs_only_near_expiry(repo, tmp_path, pkg):
    """The beat task's call: nothing when the timestamp is fresh, a new version near its
    expiry, which the device accepts for the same release."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    device.resolve(signer.bundle())

    def timestamp_version() -> int:
        return json.loads(signer.bundle()["timestamp.json"])["signed"]["version"]

    before = timestamp_version()

    # Execute
    fresh = signer.refresh_timestamp(within=timedelta(hours=12))
    renewed = signer.refresh_timestamp(within=timedelta(days=2))
    target = device.resolve(signer.bundle())

    # Assert
    assert (fresh, renewed) == (False, True)
    assert timestamp_version() == before + 1
    assert target is not None and target.release == signer.current_release() == 2


def test_publishing_the_same_assignments_signs_nothing(repo, pkg):
    """Idempotent publish: same targets (devices in any order) keep the release number and
    write no object."""
    # Prepare
    signer = repo.signer()
    first = signer.publish([assignment(repo, pkg, "v1", ["d2", "d1"])])
    objects = {k: repo.store.get(k) for k in repo.store.list("tuf/")}

    # Execute
    again = signer.publish([assignment(repo, pkg, "v1", ["d1", "d2", "d1"])])

    # Assert
    assert first == again == signer.current_release() == 2
    assert {k: repo.store.get(k) for k in repo.store.list("tuf/")} == objects
    assert signer.assignments() == [assignment(repo, pkg, "v1", ["d1", "d2"])]


def test_init_keeps_offline_keys_apart_and_refuses_a_second_root(repo, tmp_path):
    """Root and targets keys land in the offline directory, online keys owner-only in the
    worker's; a fleet that has a root is not initialised again."""
    # Prepare
    online = sorted(p.name.split("-")[0] for p in (repo.keys / repo.fleet).iterdir())
    offline = sorted(p.name.split("-")[0] for p in (repo.offline / repo.fleet).iterdir())

    # Execute
    with pytest.raises(SigningError) as refused:
        init_fleet_trust(
            store=repo.store, fleet=repo.fleet, keys_dir=repo.keys, offline_dir=repo.offline
        )

    # Assert
    assert online == ["releases", "snapshot", "timestamp"] and offline == ["root", "targets"]
    for path in (repo.keys / repo.fleet).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert refused.value.reason == "trust_exists"


def test_signed_updates_against_s3(s3_store, tmp_path, pkg):
    """The same repository on an S3 object store (SeaweedFS): publish, resolve, download."""
    # Prepare
    repo = make_repo(s3_store, tmp_path)
    device = enrolled(repo, tmp_path)
    signer = repo.signer()

    # Execute
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    bundle = signer.bundle()
    target = resolved(device, bundle)
    data = device.download(target, bundle, chunks_of(pkg))

    # Assert
    assert data == pkg and target.release == 2


def test_the_rotate_root_command_rotates_every_key_and_devices_follow(tmp_path, pkg, monkeypatch):
    """`edgeloop fleet rotate-root --online` (the operator's command) signs root v2 and new
    online keys; an enrolled device follows; without the offline keys it refuses (exit 2)."""
    import typer
    from typer.testing import CliRunner

    from cloud.commands.trust import rotate_root_cmd
    from cloud.config import get_settings
    from cloud.store.db import migrate

    # Prepare
    home = tmp_path / "home"
    monkeypatch.setenv("EDGELOOP_HOME", str(home))
    monkeypatch.setenv("EDGELOOP_STORE", "local")
    monkeypatch.setenv("EDGELOOP_TUF_KEYS_DIR", str(tmp_path / "keys"))
    get_settings.cache_clear()
    home.mkdir()
    migrate(get_settings().resolved_database_url)  # the command takes the fleet's row lock
    repo = make_repo(LocalObjectStore(home / "objects"), tmp_path)
    device = enrolled(repo, tmp_path)
    app = typer.Typer()
    app.command()(rotate_root_cmd)
    args = ["--fleet", repo.fleet, "--offline-dir"]

    # Execute
    try:
        done = CliRunner().invoke(app, [*args, str(repo.offline), "--online"])
        lost = CliRunner().invoke(app, [*args, str(tmp_path / "nowhere")])
    finally:
        get_settings.cache_clear()
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])

    # Assert
    assert done.exit_code == 0, done.output
    assert "root v2 signed" in done.output
    assert lost.exit_code == 2 and "root needs 1 key" in lost.output
    assert resolved(device, signer.bundle()).release == 2
    assert (device.metadata_dir / "root_history" / "2.root.json").is_file()


def test_enrolment_checks_the_root_and_touches_only_trust_files(repo, tmp_path, pkg):
    """A root whose signature does not verify is refused and changes nothing; a good one
    (another fleet's) replaces the trusted metadata but no other file in the directory."""
    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    device.resolve(signer.bundle())
    (device.metadata_dir / "agent-state.db").write_bytes(b"not TUF's")
    forged = json.loads(repo.root)
    forged["signed"]["expires"] = "2099-01-01T00:00:00Z"
    before = trusted_state(device)
    other = make_repo(repo.store, tmp_path)

    # Execute
    with pytest.raises(UpdateRefused) as refused:
        DeviceTrust.enroll(device.metadata_dir, json.dumps(forged).encode())
    unchanged = trusted_state(device)
    DeviceTrust.enroll(device.metadata_dir, other.root)

    # Assert
    assert refused.value.reason == "bad_signature" and unchanged == before
    assert device.last_release() is None  # the old fleet's release is no longer trusted
    assert (device.metadata_dir / "root.json").read_bytes() == other.root
    assert (device.metadata_dir / "agent-state.db").read_bytes() == b"not TUF's"


def test_a_stolen_online_key_is_recovered_by_rotating_root(repo, tmp_path, pkg):
    """An attacker with the timestamp key fast-forwards a device to timestamp v1,000,000;
    after `rotate_root(online=True)` the device accepts the real, lower versions again and
    refuses what the stolen key signs."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    # Prepare
    device = enrolled(repo, tmp_path)
    signer = repo.signer()
    signer.publish([assignment(repo, pkg, "v1", ["d1"])])
    pem = next((repo.keys / repo.fleet).glob("timestamp-*.pem")).read_bytes()
    stolen = CryptoSigner(load_pem_private_key(pem, None))

    def forged(bundle: dict[str, str]) -> dict[str, str]:
        md = Metadata.from_bytes(bundle["timestamp.json"].encode())
        md.signed.version = 1_000_000
        md.sign(stolen)
        return {**bundle, "timestamp.json": md.to_bytes().decode()}

    device.resolve(forged(signer.bundle()))  # accepted: the key was valid when used

    # Execute
    rotate_root(
        store=repo.store,
        fleet=repo.fleet,
        offline_dir=repo.offline,
        keys_dir=repo.keys,
        online=True,
    )
    signer.publish([assignment(repo, pkg, "v1", ["d1", "d2"])])
    target = resolved(device, signer.bundle())

    # Assert
    assert target.release == 3
    assert (
        json.loads((device.metadata_dir / "timestamp.json").read_bytes())["signed"]["version"] < 10
    )
    with pytest.raises(UpdateRefused) as refused:
        device.resolve(forged(signer.bundle()))
    assert refused.value.reason == "bad_signature"
