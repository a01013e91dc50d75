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


def test_power_cut_mid_slot_write(tmp_path, v1_v2, monkeypatch):
    """Power cut while v2 is written into the spare slot, leaving a third of it there: on
    restart v1 runs, the torn slot is read and refused wherever the updater would use it
    (rollback, fallback), the pointer never names it, and the next install goes over it."""
    v1, v2 = v1_v2
    ModelSlots(tmp_path, profile="cpu-fp32").install(v1)
    real = updater_mod._write_atomic

    def cut(path, data):
        if path.name == "slot-b.pkg":
            path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 3])
            raise SystemExit("power cut")
        real(path, data)

    monkeypatch.setattr(updater_mod, "_write_atomic", cut)
    with pytest.raises(SystemExit):
        ModelSlots(tmp_path, profile="cpu-fp32").install(v2)
    monkeypatch.setattr(updater_mod, "_write_atomic", real)
    torn = tmp_path / "slot-b.pkg"
    torn.write_bytes(v2[: len(v2) // 3])  # as if the rename survived and the data did not

    restarted = ModelSlots(tmp_path, profile="cpu-fp32")
    assert restarted.load_active().version == "v1" and restarted.live_slot() == "a"
    with pytest.raises(PackageError) as err:
        ModelPackage.from_path(torn)
    assert err.value.reason == "corrupt_package"
    with pytest.raises(PackageError) as err:
        restarted.rollback()  # onto the torn slot
    assert err.value.reason == "no_previous_model"
    assert restarted.live_slot() == "a"
    assert ModelSlots(tmp_path, profile="cpu-fp32").load_active().version == "v1"
    # With the live slot gone bad as well, start-up tries the torn one and refuses it too:
    # no model runs rather than half of one.
    both = tmp_path / "both-bad"
    both.mkdir()
    for name in ("current", "slot-a.pkg", "slot-b.pkg"):
        (both / name).write_bytes((tmp_path / name).read_bytes())
    (both / "slot-a.pkg").write_bytes(v1[:500])
    assert ModelSlots(both, profile="cpu-fp32").load_active() is None
    assert ModelSlots(both, profile="cpu-fp32").live_slot() == "a"
    # …and the next install over the debris works, with v1 still there to roll back to.
    slots = ModelSlots(tmp_path, profile="cpu-fp32")
    assert slots.install(v2).version == "v2" and slots.live_slot() == "b"
    assert slots.rollback().version == "v1"


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
