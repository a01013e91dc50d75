"""The reconcile on beat: a champion no rollout carries starts one, a stale read of the
registry never replaces a newer rollout, and devices that join later get the champion
once they are heard from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cloud.rollout.controller import newcomers, reconcile, start_rollout
from cloud.store.db import Device, ModelVersion, Rollout, session_factory
from shared.package import model_name

PROFILE = "cpu-fp32"


def _versions(sessions, fleet):
    with sessions() as s:
        for i in (1, 2):
            s.add(ModelVersion(name=model_name(fleet, PROFILE), version=f"v{i}",
                               mlflow_version=str(i), profile=PROFILE, sha256=f"{i}" * 64,
                               object_key=f"k{i}", class_names=["normal", "f"]))  # fmt: skip
        s.commit()


def _rollouts(sessions, fleet):
    with sessions() as s:
        rows = s.scalars(select(Rollout).where(Rollout.fleet == fleet).order_by(Rollout.id))
        return [(r.target_version, r.state, r.trigger) for r in rows]


def test_a_stale_read_of_the_champion_never_replaces_a_newer_rollout(pg_url, fleet):
    """The reconcile read champion = 1, then the alias moved to 2 and its webhook started
    v2's rollout: that stale read starts nothing. Read again after, it agrees; a champion
    read later that differs (moved back to 1) starts v1's rollout."""
    sessions = session_factory(pg_url)
    _versions(sessions, fleet)
    read_before = datetime.now(UTC) - timedelta(seconds=1)
    start_rollout(sessions=sessions, fleet=fleet, profile=PROFILE, mlflow_version="2")

    stale = reconcile(sessions=sessions, champions={(fleet, PROFILE): "1"}, read_at=read_before)
    agreeing = reconcile(sessions=sessions, champions={(fleet, PROFILE): "2"},
                         read_at=datetime.now(UTC))  # fmt: skip
    moved_back = reconcile(sessions=sessions, champions={(fleet, PROFILE): "1"},
                           read_at=datetime.now(UTC))  # fmt: skip

    assert stale == [] and agreeing == []
    assert [r.target_version for r in moved_back] == ["v1"]
    assert _rollouts(sessions, fleet) == [("v2", "superseded", "alias"),
                                          ("v1", "pending", "reconcile")]  # fmt: skip


def test_newcomers_are_devices_heard_from_that_the_champion_never_reached(pg_url, fleet):
    """After a finished rollout, a device enrolled later counts as a newcomer once it has
    sent a heartbeat (online), not while it is still in its box."""
    sessions = session_factory(pg_url)
    _versions(sessions, fleet)
    rollout = start_rollout(sessions=sessions, fleet=fleet, profile=PROFILE, mlflow_version="1")
    with sessions() as s:
        s.get(Rollout, rollout.id).state = "done"
        s.add(Device(id=f"{fleet}-boxed", fleet=fleet, profile=PROFILE, online=False))
        s.add(Device(id=f"{fleet}-on", fleet=fleet, profile=PROFILE, online=True))
        s.add(Device(id=f"{fleet}-current", fleet=fleet, profile=PROFILE, online=True,
                     model_version="v1"))  # fmt: skip
        s.commit()
        rollout = s.get(Rollout, rollout.id)

    assert newcomers(sessions=sessions, rollout=rollout) == [f"{fleet}-on"]
    started = reconcile(sessions=sessions, champions={(fleet, PROFILE): "1"})
    assert [(r.target_version, r.trigger) for r in started] == [("v1", "enrolled")]
