"""Retention against real PostgreSQL, SeaweedFS and the MLflow server: what a policy lets
expire goes (rows counted, objects listed), and each protection rule keeps what it names."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud.config import CloudSettings
from cloud.learn.replay import ReplayBuffer
from cloud.retention.plan import Plan
from cloud.retention.policy import RetentionPolicy
from cloud.retention.sweep import collect, sweep
from cloud.store.db import (
    DeadLetter,
    Delta,
    Device,
    DeviceUpdate,
    Fleet,
    Label,
    ModelVersion,
    Rollout,
    Round,
    Sample,
    session_factory,
)
from cloud.store.keys import checkpoint_key, delta_key, package_key, replay_key
from cloud.store.objects import ObjectStore
from cloud.store.records import next_version
from cloud.store.windows import npy_bytes
from shared.errors import ConfigError
from shared.package import model_name
from tests.conftest import repackage, use_cloud

NOW = datetime.now(UTC)
PROFILE = "cpu-fp32"
SETTINGS = CloudSettings(
    retention_samples_days=365,
    retention_unlabelled_days=30,
    retention_dead_letters_days=30,
    retention_deltas_days=30,
    retention_versions_keep=1,
    retention_mlflow_runs_days=1,
    retention_batch=2,  # several batches even in a small test
)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def put_windows(store: ObjectStore, key: str, n: int) -> None:
    """A batch object of ``n`` small windows (N, T, C), as ingest stores them."""
    store.put(key, npy_bytes(np.arange(n * 8 * 3, dtype=np.float32).reshape(n, 8, 3)))


def add_sample(
    s, fleet: str, sid: str, *, days: float, key: str, index: int | None, label: str | None = None
) -> None:
    s.add(
        Sample(
            id=sid,
            device_id=f"{fleet}-d1",
            fleet=fleet,
            content_sha256=sid.ljust(64, "0"),
            object_key=key,
            object_index=index,
            dtype="float32",
            shape=[8, 3],
            captured_at=ago(days),
            received_at=ago(days),
            model_version="v1",
            predicted="normal",
            confidence=0.5,
            score=0.5,
        )
    )
    s.flush()
    if label is not None:
        s.add(Label(sample_id=sid, label=label, source="operator"))


def add_version(
    s,
    fleet: str,
    version: str,
    *,
    parent: str | None,
    sha: str = "",
    mlflow_version: str | None = None,
) -> ModelVersion:
    mv = ModelVersion(
        name=model_name(fleet, PROFILE),
        version=version,
        profile=PROFILE,
        mlflow_version=mlflow_version,
        sha256=sha or version.ljust(64, "a"),
        parent=parent,
        object_key=package_key(fleet, PROFILE, version),
        class_names=["normal", "idv_01"],
    )
    s.add(mv)
    s.flush()
    return mv


def add_round(s, fleet: str, version: str, *, state: str = "done", **output: list) -> Round:
    row = Round(
        task_id=f"t-{fleet}-{version}",
        fleet=fleet,
        profile=PROFILE,
        version=version,
        state=state,
        stages={"train": {"done": True, "output": output}},
    )
    s.add(row)
    s.flush()
    return row


def add_dead_letter(
    s,
    store: ObjectStore,
    fleet: str | None,
    key: str,
    *,
    days: float,
    detail: str = "",
    size: int = 100,
) -> None:
    """A dead letter received ``days`` ago whose payload (``size`` bytes) is at ``key``."""
    store.put(key, b"x" * size)
    s.add(DeadLetter(fleet=fleet, device_id="d1", topic="t", reason="bad_json", detail=detail,
                     payload_key=key, received_at=ago(days)))  # fmt: skip


def add_rollout(s, fleet: str, target, device: str, *, base: str, state: str) -> Rollout:
    """A rollout to ``target`` (a ModelVersion) in its wave, with ``device``'s update from
    ``base`` by delta in ``state``."""
    rollout = Rollout(model_version_id=target.id, fleet=fleet, profile=PROFILE, state="wave",
                      target_version=target.version)  # fmt: skip
    s.add(rollout)
    s.flush()
    s.add(DeviceUpdate(rollout_id=rollout.id, device_id=device, target_version=target.version,
                       base_version=base, state=state, payload="delta"))  # fmt: skip
    return rollout


def setup_fleet(s, fleet: str, **settings: object) -> None:
    s.add(Fleet(id=fleet, classes=["normal", "idv_01"], settings=dict(settings)))
    s.add(Device(id=f"{fleet}-d1", fleet=fleet, profile=PROFILE))
    s.flush()


def ids(sessions, fleet: str) -> set[str]:
    with sessions() as s:
        return set(s.scalars(select(Sample.id).where(Sample.fleet == fleet)))


def reasons(plan: Plan, kind: str) -> dict[str, tuple[str, ...]]:
    return {p.ident: p.reasons for p in plan.protected if p.kind == kind}


def test_uploads_expire_by_age_except_those_a_kept_versions_lineage_names(pg_url, s3_store, fleet):
    sessions = session_factory(pg_url)
    store = s3_store
    a, b = f"windows/batches/a-{fleet}.npy", f"windows/batches/b-{fleet}.npy"
    put_windows(store, a, 2)
    put_windows(store, b, 2)
    singles = ["val", "hold", "rep", "buf", "young", "mid", "other"]
    for name in singles:
        put_windows(store, f"windows/{name}-{fleet}.npy", 1)
    other = fleet + "x"
    with sessions() as s:
        # This fleet keeps unlabelled uploads 10 days (its own override of the 30).
        setup_fleet(s, fleet, retention_unlabelled_days="10")
        setup_fleet(s, other)
        add_sample(s, fleet, "fit", days=400, key=a, index=0, label="normal")
        add_sample(s, fleet, "gone1", days=400, key=a, index=1, label="normal")
        add_sample(s, fleet, "gone2", days=400, key=b, index=0, label="idv_01")
        add_sample(s, fleet, "gone3", days=20, key=b, index=1)  # unlabelled, past the override
        for name in ("val", "hold", "rep", "buf"):
            add_sample(
                s,
                fleet,
                name,
                days=400,
                key=f"windows/{name}-{fleet}.npy",
                index=None,
                label="idv_01",
            )
        add_sample(s, fleet, "young", days=5, key=f"windows/young-{fleet}.npy", index=None)
        add_sample(
            s, fleet, "mid", days=100, key=f"windows/mid-{fleet}.npy", index=None, label="normal"
        )
        add_sample(
            s,
            other,
            "other",
            days=400,
            key=f"windows/other-{fleet}.npy",
            index=None,
            label="normal",
        )
        add_version(s, fleet, "v1", parent=None)
        add_version(s, fleet, "v2", parent="v1")
        add_round(s, fleet, "v1", fit=[])  # round 0: the base data set, no uploads
        add_round(
            s,
            fleet,
            "v2",
            fit=[["fit", "normal"]],
            validation=[["val", "idv_01"]],
            holdout=[["hold", "idv_01"]],
            replay=[["sample:rep", "idv_01"], ["base:3", "normal"]],
        )
        s.commit()
    # v2's reservoir, which the next round from v2 replays, names "buf".
    buffer = ReplayBuffer(per_class=10).offer_all([("sample:buf", "idv_01"), ("base:1", "normal")])
    store.put(replay_key(fleet, PROFILE, "v2"), buffer.to_json())

    [(plan, swept)] = collect(
        settings=SETTINGS, sessions=sessions, store=store, tracker=None, fleet=fleet, now=NOW
    )

    kept = reasons(plan, "samples")
    assert kept == {
        "fit": ("lineage: cpu-fp32 v2",),
        "val": ("lineage: cpu-fp32 v2",),
        "hold": ("lineage: cpu-fp32 v2",),
        "rep": ("lineage: cpu-fp32 v2",),
        "buf": ("replay reservoir: cpu-fp32 v2",),
    }
    assert {i.ident for i in plan.of("samples")} == {"gone1", "gone2", "gone3"}
    assert swept is not None and swept.deleted == {"samples": 3}
    # Read back: the rows, their labels and the objects.
    assert ids(sessions, fleet) == {"fit", "val", "hold", "rep", "buf", "young", "mid"}
    assert ids(sessions, other) == {"other"}  # another fleet: not collected
    with sessions() as s:
        gone_labels = s.scalar(
            select(func.count()).where(Label.sample_id.in_(["gone1", "gone2", "gone3"]))
        )
    assert gone_labels == 0
    objects = set(store.list("windows/"))
    assert a in objects  # "fit" still needs its row of the batch
    assert b not in objects  # none of its windows is left
    assert {f"windows/{n}-{fleet}.npy" for n in singles} <= objects
    # Versions and runs need the registry's aliases: without it, none is planned.
    assert plan.of("versions") == [] and any("registry" in n for n in plan.notes)


def test_an_upload_labelled_between_plan_and_sweep_stays(pg_url, s3_store, fleet):
    """Planned as unlabelled (30 days), labelled before the sweep: it is a labelled upload
    now (365 days), so it stays; the one nobody labelled goes."""
    from cloud.retention.plan import plan_fleet
    from cloud.retention.sweep import policy_of

    sessions = session_factory(pg_url)
    for name in ("late", "never"):
        put_windows(s3_store, f"windows/{name}-{fleet}.npy", 1)
    with sessions() as s:
        setup_fleet(s, fleet)
        for name in ("late", "never"):
            add_sample(s, fleet, name, days=40, key=f"windows/{name}-{fleet}.npy", index=None)
        s.commit()
    plan = plan_fleet(
        sessions=sessions, store=s3_store, tracker=None, fleet=fleet,
        policy=policy_of(sessions, SETTINGS, fleet), now=datetime.now(UTC), stale_after_s=600,
    )  # fmt: skip
    assert {i.ident for i in plan.of("samples")} == {"late", "never"}
    with sessions() as s:
        s.add(Label(sample_id="late", label="idv_01", source="operator"))
        s.commit()
    swept = sweep(sessions, s3_store, None, plan, stale_after_s=600)
    assert swept.deleted == {"samples": 1}
    assert ids(sessions, fleet) == {"late"}
    objects = set(s3_store.list("windows/"))
    assert f"windows/late-{fleet}.npy" in objects
    assert f"windows/never-{fleet}.npy" not in objects


def test_a_round_under_way_or_a_version_of_unknown_lineage_keeps_uploads(pg_url, s3_store, fleet):
    sessions = session_factory(pg_url)
    with sessions() as s:
        setup_fleet(s, fleet)
        for name, label in (("lab", "normal"), ("unl", None)):
            key = f"windows/{name}-{fleet}.npy"
            put_windows(s3_store, key, 1)
            add_sample(s, fleet, name, days=400, key=key, index=None, label=label)
        add_version(s, fleet, "v1", parent=None)
        running = add_round(s, fleet, "v2", state="train")
        s.commit()

    # A round under way may pseudo-label or train on any upload: all stay.
    [(plan, _)] = collect(
        settings=SETTINGS, sessions=sessions, store=s3_store, tracker=None, fleet=fleet, now=NOW
    )
    assert set(reasons(plan, "samples")) == {"lab", "unl"}
    assert all(r[0].startswith("round under way") for r in reasons(plan, "samples").values())
    assert ids(sessions, fleet) == {"lab", "unl"}
    assert len(s3_store.list("windows/")) == 2

    # The round failed; a kept v2 registered without a round on record: which uploads it
    # learnt from is unknown, so every labelled one stays, the unlabelled one goes.
    with sessions() as s:
        s.get(Round, running.id).state = "failed"
        add_version(s, fleet, "v2", parent="v1")
        s.commit()
    [(plan, _)] = collect(
        settings=SETTINGS,
        sessions=sessions,
        store=s3_store,
        tracker=None,
        fleet=fleet,
        now=NOW + timedelta(seconds=1),
    )
    assert reasons(plan, "samples") == {
        "lab": ("lineage unknown: cpu-fp32 v2 (no round records it)",)
    }
    assert ids(sessions, fleet) == {"lab"}
    assert s3_store.list("windows/") == [f"windows/lab-{fleet}.npy"]


def test_dead_letters_and_cached_deltas_expire_unless_a_rollout_in_flight_uses_them(
    pg_url, s3_store, fleet
):
    sessions = session_factory(pg_url)
    other = fleet + "x"
    letters = {"old": (fleet, 40), "young": (fleet, 5), "other": (other, 40), "nofleet": (None, 40)}
    with sessions() as s:
        setup_fleet(s, fleet)
        for name, (f, days) in letters.items():
            add_dead_letter(s, s3_store, f, f"dead-letters/{name}-{fleet}.bin", days=days,
                            detail=name)  # fmt: skip
        v = {n: add_version(s, fleet, n, parent=None, sha=n * 32) for n in ("v1", "v2", "v3")}
        add_rollout(s, fleet, v["v3"], f"{fleet}-d1", base="v2", state="sent")
        pairs = {"v1>v2": 40, "v2>v3": 40, "v1>v3": 5, "none>v2": 40}
        for pair, days in pairs.items():
            base, target = pair.split(">")
            key = delta_key(fleet, PROFILE, target, base.ljust(64, "0"))
            offered = base != "none"  # "none": the delta was not smaller, no object
            if offered:
                s3_store.put(key, b"d" * 50)
            s.add(
                Delta(
                    fleet=fleet,
                    profile=PROFILE,
                    base_version=base,
                    target_version=target,
                    base_sha256=base.ljust(64, "0"),
                    target_sha256=target.ljust(64, "0"),
                    object_key=key,
                    sha256="e" * 64 if offered else None,
                    length=50 if offered else None,
                    target_length=500,
                    created_at=ago(days),
                )
            )
        s.commit()

    [(plan, swept)] = collect(
        settings=SETTINGS, sessions=sessions, store=s3_store, tracker=None, fleet=fleet, now=NOW
    )
    with sessions() as s:
        left = set(s.scalars(select(DeadLetter.detail)))
        deltas = {f"{d.base_version}>{d.target_version}" for d in s.scalars(select(Delta))}
    assert left == {"young", "other", "nofleet"}
    assert deltas == {"v2>v3", "v1>v3"}
    # v2→v3 is offered to a device of the live rollout: kept past its age.
    kept = reasons(plan, "deltas")
    assert len(kept) == 1 and all("rollout offers it" in r[0] for r in kept.values())
    assert swept is not None and swept.deleted == {"dead_letters": 1, "deltas": 2}
    assert swept.bytes == {"dead_letters": 100, "deltas": 50}
    assert f"dead-letters/old-{fleet}.bin" not in s3_store.list("dead-letters/")
    assert len(s3_store.list("dead-letters/")) == 3
    assert sorted(s3_store.list("deltas/")) == sorted(
        delta_key(fleet, PROFILE, t, b.ljust(64, "0")) for b, t in (("v2", "v3"), ("v1", "v3"))
    )

    # A collection killed between its rows and its objects left a journal: the next one
    # deletes the objects no row names any more, and the journal.
    s3_store.put(f"dead-letters/killed-{fleet}.bin", b"z")
    s3_store.put(
        "gc/pending/killed.json",
        json.dumps(
            [f"dead-letters/killed-{fleet}.bin", f"dead-letters/young-{fleet}.bin"]
        ).encode(),
    )
    collect(
        settings=SETTINGS, sessions=sessions, store=s3_store, tracker=None, fleet=fleet, now=NOW
    )
    assert s3_store.list("gc/") == []
    assert f"dead-letters/killed-{fleet}.bin" not in s3_store.list("dead-letters/")
    assert f"dead-letters/young-{fleet}.bin" in s3_store.list("dead-letters/")

    # Every fleet: the other fleet's old one and the one no fleet could be read from go too;
    # a fleet whose overrides are wrong is left as it is, the others are collected.
    with sessions() as s:
        s.add(Fleet(id=fleet + "bad", settings={"retention_sample_days": 1}))
        s.add(
            DeadLetter(
                fleet=fleet + "bad", topic="t", reason="r", detail="bad fleet", received_at=ago(40)
            )
        )
        s.commit()
    done = collect(settings=SETTINGS, sessions=sessions, store=s3_store, tracker=None, now=NOW)
    [bad] = [p for p, _ in done if p.fleet == fleet + "bad"]
    assert "retention_sample_days" in bad.notes[0] and bad.doomed == []
    with sessions() as s:
        assert set(s.scalars(select(DeadLetter.detail))) == {"young", "bad fleet"}
    assert s3_store.list("dead-letters/") == [f"dead-letters/young-{fleet}.bin"]


def _log_run(registry, name: str, package: bytes) -> str:
    """A finished run with the package as its artifact, as a round logs it."""
    run = registry.client.create_run(registry.experiment_id, run_name=name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.edgepkg"
        path.write_bytes(package)
        registry.client.log_artifact(run.info.run_id, str(path), "edge_package")
    registry.client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.services
def test_old_versions_go_but_never_one_a_device_runs_an_alias_names_or_a_rollout_needs(
    pg_url, s3_store, fleet, mlflow_uri, tiny_package
):
    from cloud.tracking.registry import Registry
    from cloud.tracking.retention import RetentionTracker

    sessions = session_factory(pg_url)
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    tracker = RetentionTracker(mlflow_uri)
    names = ["v1", "v2", "v3", "v4", "v5"]
    packages = {"v1": tiny_package[0], **{v: repackage(tiny_package, v) for v in names[1:]}}
    runs, rows = {}, {}
    for v in names:  # v3 passes its gates (champion); v5, registered last, is challenger
        runs[v] = _log_run(registry, v, packages[v])
        rows[v] = registry.register(
            fleet=fleet,
            run_id=runs[v],
            package=packages[v],
            gates={"passed": v == "v3"},
            promote=v == "v3",
        )
    stray = _log_run(registry, "stray", b"not registered")
    with sessions() as s:
        setup_fleet(s, fleet)
        s.add(Device(id=f"{fleet}-d2", fleet=fleet, profile=PROFILE, model_version="v5"))
        s.get(Device, f"{fleet}-d1").model_version = "v1"  # d1 runs v1
        mv = {
            v: add_version(
                s,
                fleet,
                v,
                parent=None if v == "v1" else "v1",
                sha=rows[v].sha256,
                mlflow_version=rows[v].mlflow_version,
            )
            for v in names
        }
        # A rollout to v5 under way: d2 installed it from v2 (its rollback base).
        add_rollout(s, fleet, mv["v5"], f"{fleet}-d2", base="v2", state="installed")
        for v in ("v3", "v4"):  # each learnt from one upload
            key = f"windows/{v}-{fleet}.npy"
            put_windows(s3_store, key, 1)
            add_sample(s, fleet, f"s-{v}", days=400, key=key, index=None, label="normal")
            add_round(s, fleet, v, fit=[[f"s-{v}", "normal"]])
        for v in ("v2", "v5"):  # from no upload
            add_round(s, fleet, v, fit=[])
        for v in names:
            s3_store.put(package_key(fleet, PROFILE, v), packages[v])
            s3_store.put(checkpoint_key(fleet, PROFILE, v), b"teacher " + v.encode())
        s3_store.put(replay_key(fleet, PROFILE, "v4"), ReplayBuffer(per_class=1).to_json())
        for base in ("v4", "v3"):
            sha = mv[base].sha256
            s3_store.put(delta_key(fleet, PROFILE, "v5", sha), b"delta")
            s.add(
                Delta(
                    fleet=fleet,
                    profile=PROFILE,
                    base_version=base,
                    target_version="v5",
                    base_sha256=sha,
                    target_sha256=mv["v5"].sha256,
                    object_key=delta_key(fleet, PROFILE, "v5", sha),
                    sha256="f" * 64,
                    length=5,
                    target_length=len(packages["v5"]),
                )
            )
        s.commit()

    # Two days on, with runs kept one day: every run is old enough to go.
    later = datetime.now(UTC) + timedelta(days=2)
    [(dry, none)] = collect(
        settings=SETTINGS,
        sessions=sessions,
        store=s3_store,
        tracker=tracker,
        fleet=fleet,
        now=later,
        dry_run=True,
    )
    assert none is None and [i.ident for i in dry.of("versions")] == ["cpu-fp32/v4"]
    assert len(registry.client.search_model_versions(f"name = '{model_name(fleet, PROFILE)}'")) == 5

    # d1 moves to v4 after the plan was made: the sweep reads the rules again and keeps
    # v4, and with it what v4's going would have freed (its upload, its run).
    with sessions() as s:
        s.get(Device, f"{fleet}-d1").model_version = "v4"
        s.commit()
    swept = sweep(sessions, s3_store, tracker, dry, stale_after_s=3600)
    assert swept.deleted == {} and any("cpu-fp32/v4 kept: device runs it" in n for n in swept.notes)
    assert len(registry.client.search_model_versions(f"name = '{model_name(fleet, PROFILE)}'")) == 5
    assert "s-v4" in ids(sessions, fleet)
    assert registry.client.get_run(runs["v4"]).info.lifecycle_stage == "active"
    with sessions() as s:
        s.get(Device, f"{fleet}-d1").model_version = "v1"
        s.commit()

    [(plan, swept)] = collect(
        settings=SETTINGS,
        sessions=sessions,
        store=s3_store,
        tracker=tracker,
        fleet=fleet,
        now=later,
    )
    why = {
        k.split("/")[1]: {r.split(":")[0] for r in v} for k, v in reasons(plan, "versions").items()
    }
    assert why == {
        "v1": {"device runs it"},
        "v2": {"rollout base"},
        "v3": {"alias"},
        "v5": {"device runs it", "rollout target", "newest 1", "alias"},
    }
    # The registry read back: v4's model version is gone, the others stay.
    left = registry.client.search_model_versions(f"name = '{model_name(fleet, PROFILE)}'")
    assert sorted(m.tags["edgeloop_version"] for m in left) == ["v1", "v2", "v3", "v5"]
    assert registry.champion(fleet, PROFILE)[1]["edgeloop_version"] == "v3"
    # Its package, checkpoint and reservoir are gone; every other version's stay.
    objects = set(s3_store.list())
    for v in names:
        for key in (package_key(fleet, PROFILE, v), checkpoint_key(fleet, PROFILE, v)):
            assert (key in objects) == (v != "v4"), key
    assert replay_key(fleet, PROFILE, "v4") not in objects
    # Its row stays, marked expired: the next round is still v6.
    with sessions() as s:
        expired = {m.version for m in s.scalars(select(ModelVersion)) if m.expired_at is not None}
        deltas = {d.base_version for d in s.scalars(select(Delta))}
    assert expired == {"v4"} and next_version(sessions, model_name(fleet, PROFILE)) == "v6"
    # The delta from v4 is of no use any more; the one from v3 (young) stays.
    assert deltas == {"v3"}
    assert delta_key(fleet, PROFILE, "v5", mv["v4"].sha256) not in objects
    # v4's lineage no longer protects its upload; v3's (champion) still does.
    assert ids(sessions, fleet) == {"s-v3"}
    # Runs: v4's and the stray one are deleted with their artifacts; the kept versions'
    # runs and artifacts stay.
    assert {i.ident for i in plan.of("mlflow_runs")} == {runs["v4"], stray}
    for v, run_id in [*runs.items(), ("stray", stray)]:
        gone = v in ("v4", "stray")
        run = registry.client.get_run(run_id)
        assert (run.info.lifecycle_stage == "deleted") == gone, v
        assert bool(tracker.run_bytes(run_id)) != gone, v
    assert swept is not None and swept.deleted == {
        "versions": 1,
        "samples": 1,
        "deltas": 1,
        "mlflow_runs": 2,
    }

    # Again: nothing more goes.
    [(again, _)] = collect(
        settings=SETTINGS,
        sessions=sessions,
        store=s3_store,
        tracker=tracker,
        fleet=fleet,
        now=later,
    )
    assert again.doomed == []


def test_policy_takes_a_fleets_overrides_and_refuses_bad_ones():
    policy = RetentionPolicy.resolve(SETTINGS, {"retention_samples_days": "90", "other": 1})
    assert policy.samples_days == 90.0 and policy.versions_keep == 1
    assert policy.cutoff(NOW, 0) is None  # 0: kept forever
    with pytest.raises(ConfigError, match="retention_sample_days"):
        RetentionPolicy.resolve(SETTINGS, {"retention_sample_days": 90})
    with pytest.raises(ConfigError, match="retention_versions_keep"):
        RetentionPolicy.resolve(SETTINGS, {"retention_versions_keep": "2.5"})
    with pytest.raises(ConfigError, match="at least 1"):
        RetentionPolicy.resolve(SETTINGS, {"retention_versions_keep": 0})
    with pytest.raises(ConfigError, match="negative"):
        RetentionPolicy.resolve(SETTINGS, {"retention_deltas_days": -1})


def test_gc_command_and_beat_task_print_the_plan_and_delete_under_one_lock(
    monkeypatch, pg_url, s3_store, fleet, mlflow_uri
):
    import redis
    import typer
    from typer.testing import CliRunner

    from cloud.cli import app
    from cloud.config import get_settings
    from cloud.retention.run import GcLock
    from cloud.tasks import _services

    use_cloud(monkeypatch, pg_url, s3_store, EDGELOOP_MLFLOW_TRACKING_URI=mlflow_uri)
    sessions = session_factory(pg_url)
    with sessions() as s:
        setup_fleet(s, fleet)
        add_dead_letter(s, s3_store, fleet, f"dead-letters/{fleet}.bin", days=40, size=2000)
        s.commit()
    assert isinstance(app, typer.Typer)
    cli = CliRunner()
    try:
        out = cli.invoke(app, ["gc", "--fleet", fleet, "--dry-run"])
        assert out.exit_code == 0, out.output
        line = next(x for x in out.output.splitlines() if x.strip().startswith("dead_letters"))
        assert line.split()[:3] == ["dead_letters", "1", "2.0"]
        assert "dry run: nothing deleted" in out.output
        assert s3_store.list("dead-letters/") == [f"dead-letters/{fleet}.bin"]

        lock = GcLock(redis.Redis.from_url(get_settings().redis_url))
        assert lock.acquire()
        try:
            out = cli.invoke(app, ["gc", "--fleet", fleet])
            assert out.exit_code == 1 and "a garbage collection is running" in out.output
            assert s3_store.list("dead-letters/") == [f"dead-letters/{fleet}.bin"]
        finally:
            lock.release()

        out = cli.invoke(app, ["gc", "--fleet", fleet])
        assert out.exit_code == 0, out.output
        header = next(x for x in out.output.splitlines() if x.strip().startswith("kind"))
        line = next(x for x in out.output.splitlines() if x.strip().startswith("dead_letters"))
        assert header.split()[:4] == ["kind", "count", "bytes", "deleted"]
        assert line.split()[:5] == ["dead_letters", "1", "2.0", "kB", "1"]
        assert s3_store.list("dead-letters/") == []
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(DeadLetter)) == 0

        # The beat task: skips while another collection holds the lock, collects after.
        from cloud.tasks import gc

        _services.cache_clear()
        with sessions() as s:
            add_dead_letter(s, s3_store, fleet, f"dead-letters/{fleet}-2.bin", days=40, size=10)
            s.commit()
        assert lock.acquire()
        try:
            assert "a garbage collection is running" in gc.run(fleet)["skipped"]
        finally:
            lock.release()
        assert gc.run(fleet)[fleet]["deleted"] == {"dead_letters": 1}
        assert s3_store.list("dead-letters/") == []
    finally:
        get_settings.cache_clear()
        _services.cache_clear()


def test_beat_runs_gc_daily_at_the_configured_hour():
    from cloud.tasks import app, gc

    entry = app.conf.beat_schedule["edgeloop-gc"]
    assert entry["task"] == gc.name == "edgeloop.gc"
    assert entry["schedule"].hour == {CloudSettings().retention_gc_hour_utc}


def test_embedded_sqlite_and_a_directory_store_are_collected_the_same_way(tmp_path):
    """The demo's backends: SQLite (naive datetimes) and a local directory."""
    from cloud.store.db import migrate
    from cloud.store.objects import LocalObjectStore

    url = f"sqlite:///{tmp_path / 'edgeloop.db'}"
    migrate(url)
    sessions = session_factory(url)
    store = LocalObjectStore(tmp_path / "objects")
    fleet = "plant"
    with sessions() as s:
        setup_fleet(s, fleet)
        for name, days in (("old", 400), ("young", 5)):
            put_windows(store, f"windows/{name}.npy", 1)
            add_sample(s, fleet, name, days=days, key=f"windows/{name}.npy", index=None)
            store.put(f"dead-letters/{name}.bin", b"x" * 7)
            s.add(
                DeadLetter(
                    fleet=fleet,
                    topic="t",
                    reason="r",
                    detail=name,
                    payload_key=f"dead-letters/{name}.bin",
                    received_at=ago(days),
                )
            )
            s.add(
                Delta(
                    fleet=fleet,
                    profile=PROFILE,
                    base_version=name,
                    target_version="v2",
                    base_sha256=name.ljust(64, "0"),
                    target_sha256="2" * 64,
                    object_key=f"deltas/{name}",
                    length=None,
                    target_length=5,
                    created_at=ago(days),
                )
            )
        s.commit()
    [(plan, swept), _] = collect(
        settings=SETTINGS, sessions=sessions, store=store, tracker=None, now=NOW
    )
    assert swept is not None
    assert swept.deleted == {"samples": 1, "dead_letters": 1, "deltas": 1}
    assert swept.bytes["dead_letters"] == 7
    assert store.list() == ["dead-letters/young.bin", "windows/young.npy"]
    with sessions() as s:
        assert set(s.scalars(select(Delta.base_version))) == {"young"}
