"""Model slots: verified install, atomic swap, rollback, and power cuts between steps."""

from __future__ import annotations

import pytest

from edge_agent import updater as updater_mod
from edge_agent.updater import ModelSlots
from shared.errors import PackageError
from shared.package import ModelPackage

from .conftest import repackage


@pytest.fixture(scope="module")
def v1_v2(tiny_package):
    return tiny_package[0], repackage(tiny_package, "v2")


def test_install_swap_and_rollback(tmp_path, v1_v2):
    """v1 then v2 go live in alternate slots; rollback brings v1 back, across restarts."""
    v1, v2 = v1_v2
    slots = ModelSlots(tmp_path, profile="cpu-fp32")
    assert slots.load_active() is None
    assert slots.install(v1).version == "v1"
    assert slots.install(v2, expected_sha256=ModelPackage(v2).sha256).version == "v2"
    assert ModelSlots(tmp_path, profile="cpu-fp32").load_active().version == "v2"
    assert slots.rollback().version == "v1"
    assert ModelSlots(tmp_path, profile="cpu-fp32").load_active().version == "v1"


@pytest.mark.parametrize(
    "make_bad, reason",
    [
        (lambda v: v[:1000], "corrupt_package"),
        (lambda v: b"garbage", "corrupt_package"),
    ],
)
def test_bad_package_keeps_running_model(tmp_path, v1_v2, make_bad, reason):
    """A corrupt package is refused with its reason; the live model stays live."""
    v1, v2 = v1_v2
    slots = ModelSlots(tmp_path, profile="cpu-fp32")
    slots.install(v1)
    with pytest.raises(PackageError) as err:
        slots.install(make_bad(v2))
    assert err.value.reason == reason
    assert slots.load_active().version == "v1"


def test_wrong_profile_and_wrong_sha_are_refused(tmp_path, v1_v2):
    """A package for another profile, or not the one announced, never goes live."""
    v1, v2 = v1_v2
    slots = ModelSlots(tmp_path, profile="mcu-int4")
    with pytest.raises(PackageError) as err:
        slots.install(v1)
    assert err.value.reason == "wrong_profile"
    slots = ModelSlots(tmp_path / "b", profile="cpu-fp32")
    slots.install(v1)
    with pytest.raises(PackageError) as err:
        slots.install(v2, expected_sha256=ModelPackage(v1).sha256)
    assert err.value.reason == "sha_mismatch"
    assert slots.load_active().version == "v1"


def test_power_cut_before_pointer_flip(tmp_path, v1_v2, monkeypatch):
    """Killed after the spare slot is written but before the pointer flips: v1 on restart."""
    v1, v2 = v1_v2
    ModelSlots(tmp_path, profile="cpu-fp32").install(v1)
    real = updater_mod._write_atomic

    def cut(path, data):
        if path.name == "current":
            raise SystemExit("power cut")
        real(path, data)

    monkeypatch.setattr(updater_mod, "_write_atomic", cut)
    with pytest.raises(SystemExit):
        ModelSlots(tmp_path, profile="cpu-fp32").install(v2)
    monkeypatch.setattr(updater_mod, "_write_atomic", real)
    assert ModelSlots(tmp_path, profile="cpu-fp32").load_active().version == "v1"


def test_power_cut_mid_slot_write(tmp_path, v1_v2):
    """A half-written spare slot (temp file left behind) never becomes live."""
    v1, v2 = v1_v2
    ModelSlots(tmp_path, profile="cpu-fp32").install(v1)
    (tmp_path / "slot-b.pkg.tmp").write_bytes(v2[: len(v2) // 3])
    (tmp_path / "slot-b.pkg").write_bytes(v2[: len(v2) // 3])
    assert ModelSlots(tmp_path, profile="cpu-fp32").load_active().version == "v1"
    # …and the next install over the debris still works.
    assert ModelSlots(tmp_path, profile="cpu-fp32").install(v2).version == "v2"


def test_live_slot_damaged_falls_back(tmp_path, v1_v2):
    """If the live slot is damaged on disk, start-up falls back to the other slot."""
    v1, v2 = v1_v2
    slots = ModelSlots(tmp_path, profile="cpu-fp32")
    slots.install(v1)
    slots.install(v2)
    live = tmp_path / f"slot-{slots.live_slot()}.pkg"
    live.write_bytes(live.read_bytes()[:500])
    restarted = ModelSlots(tmp_path, profile="cpu-fp32")
    assert restarted.load_active().version == "v1"
    assert restarted.live_slot() == "a"  # the pointer follows the fallback
