"""Trigger policies on a real PostgreSQL, and the round lock on a real Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select

from cloud.learn.lock import RoundLock
from cloud.learn.triggers import TriggerPolicy, check, due_rounds
from cloud.store.db import Device, Label, ModelVersion, Round, Sample, session_factory
from shared.package import model_name

from .conftest import HOST, REDIS_PORT, require, unique

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def fleet_db(pg_url):
    """A fleet with one online device (anomaly rate 0.1), model v1 (trained on labels up to
    id 3, fleet anomaly rate 0.1 then), and five labelled samples (ids 1–5)."""
    sessions = session_factory(pg_url)
    with sessions() as s:
        s.add(Device(id="d1", fleet="f", profile="p", online=True, health={"anomaly_rate": 0.1}))
        for i in range(5):
            s.add(
                Sample(
                    id=f"s{i}", device_id="d1", fleet="f", content_sha256=f"{i:064d}",
                    object_key="k", dtype="float32", shape=[32, 53], captured_at=NOW,
                    model_version="v1", predicted="normal", confidence=0.5, score=0.0,
                )
            )  # fmt: skip
        s.flush()
        for i in range(5):
            s.add(Label(sample_id=f"s{i}", label="idv_06", source="device"))
        s.add(
            ModelVersion(
                name=model_name("f", "p"), version="v1", profile="p", sha256="0" * 64,
                object_key="k", class_names=["normal"], created_at=NOW - timedelta(hours=2),
                gates={"passed": True},
                baselines={"fleet_anomaly_rate": 0.1, "label_watermark": 3},
            )
        )  # fmt: skip
        s.commit()
        ids = [lab.id for lab in s.scalars(select(Label).order_by(Label.id))]
    assert ids == [1, 2, 3, 4, 5]
    return sessions


def _check(sessions, **policy):
    with sessions() as s:
        return check(session=s, fleet="f", profile="p", policy=TriggerPolicy(**policy), now=NOW)


def test_new_labels_count_from_the_last_round_watermark(fleet_db):
    """Labels after the id the last round read are new, whenever they arrived."""
    assert _check(fleet_db, min_new_labels=2).reasons == ["new_labels=2"]
    assert _check(fleet_db, min_new_labels=3).reasons == []


def test_drift_fires_on_an_anomaly_rate_jump_with_labels_only(fleet_db):
    """0.1 → 0.5 fires drift; with no new label drift alone starts nothing."""
    with fleet_db() as s:
        s.get(Device, "d1").health = {"anomaly_rate": 0.5}
        s.commit()
    one = {"min_new_labels": 99, "drift_min_devices": 1}
    assert any(r.startswith("drift") for r in _check(fleet_db, **one).reasons)
    # Fewer devices report than drift asks for: nothing.
    assert _check(fleet_db, min_new_labels=99).reasons == []
    with fleet_db() as s:
        s.query(Label).filter(Label.id > 3).delete()
        s.commit()
    assert _check(fleet_db, **one).reasons == []


def test_one_device_claiming_anomalies_is_not_drift(fleet_db):
    """The median of the fleet's rates: one device of three claiming 1.0 fires nothing;
    two of three at 0.5 are the fleet's rate, and fire."""
    with fleet_db() as s:
        s.add_all(
            Device(id=d, fleet="f", profile="p", online=True, health={"anomaly_rate": 0.1})
            for d in ("d2", "d3")
        )
        s.get(Device, "d1").health = {"anomaly_rate": 1.0}
        s.commit()
    assert _check(fleet_db, min_new_labels=99).reasons == []
    with fleet_db() as s:
        s.get(Device, "d2").health = {"anomaly_rate": 0.5}
        s.commit()
    assert [r for r in _check(fleet_db, min_new_labels=99).reasons if r.startswith("drift")] == [
        "drift: anomaly rate 0.10→0.50"
    ]


def test_rounds_never_start_back_to_back(fleet_db):
    """Whatever fires, no round starts within min_interval_h of the previous one's start:
    a device flooding labels gets at most one round per interval."""
    with fleet_db() as s:
        s.add(
            Round(task_id="t1", fleet="f", profile="p", version="v2", state="done",
                  reason="", attempts=1, created_at=NOW - timedelta(minutes=5),
                  updated_at=NOW - timedelta(minutes=1))
        )  # fmt: skip
        s.commit()
    assert _check(fleet_db, min_new_labels=1, min_interval_h=1).reasons == []
    assert _check(fleet_db, min_new_labels=1, min_interval_h=0.05).reasons == ["new_labels=2"]


def test_schedule_fires_only_when_old_enough(fleet_db):
    """Two hours since v1: due under a one-hour schedule, not under three, nor with none."""
    assert _check(fleet_db, min_new_labels=99, max_age_h=1).reasons[0].startswith("schedule")
    assert _check(fleet_db, min_new_labels=99, max_age_h=3).reasons == []
    assert _check(fleet_db, min_new_labels=99, max_age_h=None).reasons == []


def test_a_failed_round_backs_off(fleet_db):
    """After a failed round the fleet is not due until backoff_h has passed."""
    with fleet_db() as s:
        s.add(
            Round(task_id="t1", fleet="f", profile="p", version="v2", state="failed",
                  reason="", attempts=1, created_at=NOW - timedelta(minutes=10),
                  updated_at=NOW - timedelta(minutes=10))
        )  # fmt: skip
        s.commit()
    assert _check(fleet_db, min_new_labels=1, backoff_h=1).reasons == []
    # (min_interval_h=0: the failed round also started 10 minutes ago.)
    late = _check(fleet_db, min_new_labels=1, backoff_h=0.1, min_interval_h=0)
    assert late.reasons == ["new_labels=2"]
    with fleet_db() as s:
        assert [
            d.fleet for d in due_rounds(session=s, policy=TriggerPolicy(min_new_labels=1), now=NOW)
        ] == []


def test_round_lock_is_exclusive_renewed_and_released_only_by_its_holder():
    """A second lock is refused; a held lock outlives its TTL while renewed; another
    holder's release does nothing; after release it can be taken."""
    require("Redis", REDIS_PORT)
    client = redis.Redis(host=HOST, port=REDIS_PORT, db=15)
    fleet = unique("f")
    first, second = RoundLock(client, fleet, "p", ttl_s=1), RoundLock(client, fleet, "p", ttl_s=1)

    assert first.acquire()
    assert not second.acquire()
    time.sleep(2.5)  # more than the TTL: only renewal keeps it
    assert first.holder() == first.token
    second.release()  # not the holder: nothing happens
    assert first.holder() == first.token
    first.release()
    assert first.holder() is None
    assert second.acquire()
    second.release()


def test_retrain_command_without_a_broker_says_what_to_do():
    """`edgeloop retrain` with Redis down exits 2 at once, saying what to start."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGELOOP_REDIS_URL": "redis://127.0.0.1:9/0"}  # nothing listens

    out = subprocess.run(
        [sys.executable, "-c", "from shared.cli import main; main()", "retrain", "--fleet", "f"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert out.returncode == 2
    assert "does not answer" in out.stderr and "edgeloop cloud worker" in out.stderr
