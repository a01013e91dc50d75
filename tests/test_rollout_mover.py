"""Who moved a champion alias is recorded with the rollout it started: `edgeloop rollout
promote --by` tags the version before it moves the alias; a move made in the MLflow UI
(whose alias events name no user) is recorded as unknown, never as an earlier mover of the
same version; `edgeloop rollout status ID` shows it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cloud.rollout.controller import reconcile
from cloud.rollout.mover import UNKNOWN_MOVER, moved_by
from cloud.store.db import Rollout, session_factory
from cloud.store.objects import LocalObjectStore
from shared.package import ModelPackage, model_name
from tests.fleetkit import package_variant, register_package


def test_moved_by_trusts_only_a_tag_newer_than_the_previous_rollout():
    """The tag names the mover when it was set after the previous rollout began (or there
    was none); an older tag, or none, gives unknown."""
    now = datetime.now(UTC)
    tagged = ("alice", now.timestamp())
    assert moved_by(tagged, None) == "alice"
    assert moved_by(tagged, now - timedelta(minutes=5)) == "alice"
    assert moved_by(tagged, now + timedelta(seconds=1)) == UNKNOWN_MOVER
    assert moved_by(None, None) == UNKNOWN_MOVER


def test_the_mover_is_recorded_with_the_rollout_and_shown(
    pg_url, mlflow_uri, fleet, tiny_package, tmp_path, monkeypatch
):
    """promote --by alice → the reconcile's rollout records alice; the alias moved in MLflow
    itself (as the UI does) → unknown, also when it goes back to alice's version."""
    from typer.testing import CliRunner

    from cloud.commands.rollout import rollout_app
    from cloud.config import get_settings
    from cloud.tracking.registry import open_registry
    from cloud.tracking.rollouts import open_tracker

    sessions = session_factory(pg_url)
    for key, value in {
        "DATABASE_URL": pg_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(f"EDGELOOP_{key}", value)  # fmt: skip
    get_settings.cache_clear()
    settings = get_settings()
    registry, tracker = open_registry(settings, fleet), open_tracker(settings)
    pkg, _ = tiny_package
    profile = ModelPackage(pkg).manifest.profile
    name = model_name(fleet, profile)
    common = {"sessions": sessions, "store": LocalObjectStore(tmp_path / "objects")}
    v1 = register_package(**common, registry=registry, fleet=fleet, package=pkg)
    v2 = register_package(
        **common, registry=registry, fleet=fleet, package=package_variant(tiny_package, "v2")
    )

    def beat_reconcile() -> Rollout:
        champions = {k: v for k, v in tracker.champions().items() if k[0] == fleet}
        started = reconcile(
            sessions=sessions,
            champions=champions,
            read_at=datetime.now(UTC),
            mover_of=tracker.mover,
        )
        assert len(started) == 1
        return started[0]

    cli = CliRunner()
    promoted = cli.invoke(
        rollout_app, ["promote", "v1", "--fleet", fleet, "--profile", profile, "--by", "alice"]
    )
    assert promoted.exit_code == 0, promoted.output
    by_alice = beat_reconcile()
    tracker.client.set_registered_model_alias(name, "champion", v2)  # the MLflow UI's move
    in_the_ui = beat_reconcile()
    tracker.client.set_registered_model_alias(name, "champion", v1)  # … and back
    back_in_the_ui = beat_reconcile()
    status = cli.invoke(rollout_app, ["status", str(by_alice.id)])
    missing = cli.invoke(
        rollout_app, ["promote", "v9", "--fleet", fleet, "--profile", profile, "--by", "bob"]
    )
    get_settings.cache_clear()

    with sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Rollout).where(Rollout.fleet == fleet))}
    assert (rows[by_alice.id].mlflow_version, rows[by_alice.id].moved_by) == (v1, "alice")
    assert (rows[in_the_ui.id].mlflow_version, rows[in_the_ui.id].moved_by) == (v2, UNKNOWN_MOVER)
    assert rows[back_in_the_ui.id].mlflow_version == v1
    assert rows[back_in_the_ui.id].moved_by == UNKNOWN_MOVER
    assert "champion moved by alice" in status.stdout
    assert missing.exit_code == 1 and "has no registered version v9" in missing.stderr


def test_the_alias_task_records_the_mover(
    pg_url, mlflow_uri, fleet, tiny_package, tmp_path, monkeypatch
):
    """The webhook's path: `rollout promote --by carol`, then the alias task (as the worker
    runs it for MLflow's event) starts the rollout with carol as its mover. Its first step
    is only enqueued (recorded here): stepping is the controller tests' concern."""
    from typer.testing import CliRunner

    import cloud.tasks as tasks
    from cloud.commands.rollout import rollout_app
    from cloud.config import get_settings
    from cloud.tracking.registry import open_registry

    for key, value in {
        "DATABASE_URL": pg_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "HOME": str(tmp_path),
        "STORE": "local",
    }.items():
        monkeypatch.setenv(f"EDGELOOP_{key}", value)  # fmt: skip
    caches = (get_settings, tasks._services, tasks._tracker)
    for cache in caches:
        cache.cache_clear()
    sessions, store, _ = tasks._services()
    pkg, _ = tiny_package
    profile = ModelPackage(pkg).manifest.profile
    registry = open_registry(get_settings(), fleet)
    version = register_package(
        sessions=sessions, store=store, registry=registry, fleet=fleet, package=pkg
    )
    enqueued: list[int] = []
    monkeypatch.setattr(tasks.advance_rollout, "delay", enqueued.append)

    promoted = CliRunner().invoke(
        rollout_app, ["promote", "v1", "--fleet", fleet, "--profile", profile, "--by", "carol"]
    )
    answer = tasks.rollout_on_alias.apply(args=(fleet, profile, version)).get()
    for cache in caches:
        cache.cache_clear()

    assert promoted.exit_code == 0, promoted.output
    assert enqueued == [answer["rollout"]]
    with sessions() as s:
        row = s.get(Rollout, answer["rollout"])
        assert row is not None
        assert (row.trigger, row.mlflow_version, row.moved_by) == ("alias", version, "carol")
