"""A retraining round against the real MLflow server, PostgreSQL and SeaweedFS S3; and the
same round as a Celery task on a real worker over Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from sqlalchemy import select

from cloud.datasets import LabelledWindows, register_dataset
from cloud.db import Label, ModelVersion, Round, Sample, session_factory
from cloud.ingest import content_sha256, npy_bytes, register_device
from cloud.learning import RoundConfig, load_checkpoint, run_round, train_initial
from cloud.registry import Registry, model_name
from cloud.training import TrainConfig
from shared.package import ModelPackage
from sim.tep import generate

from .conftest import (
    HOST,
    REDIS_PORT,
    S3_KEY,
    S3_PORT,
    S3_SECRET,
    TEP_CACHE,
    require,
    wait_for,
)


def labelled(w):
    return LabelledWindows(w.x, np.array(w.class_names)[w.y])


@pytest.fixture
def fleet_with_uploads(pg_url, s3_store, mlflow_uri, fleet, tep_small):
    """Base and golden sets registered, an initial model, and labelled uploads of a fault
    the model has never seen (as ingest would have stored them)."""
    train, golden = tep_small
    new = generate(
        classes=["idv_06"], runs_per_class=2, seed=5, horizon_h=4.0, cache_dir=TEP_CACHE, workers=2
    )
    new_golden = generate(
        classes=["idv_06"], runs_per_class=1, seed=99, horizon_h=4.0, cache_dir=TEP_CACHE
    )
    register_dataset(store=s3_store, name="base", data=labelled(train))
    gold = LabelledWindows(
        np.concatenate([golden.x, new_golden.x]),
        np.concatenate([labelled(golden).labels, np.array(["idv_06"] * len(new_golden))]),
    )
    register_dataset(store=s3_store, name="golden", data=gold)
    sessions = session_factory(pg_url)
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    cfg = RoundConfig(fleet=fleet, train=TrainConfig(epochs=15, lr=2e-3))
    first = train_initial(sessions=sessions, store=s3_store, registry=registry, cfg=cfg)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
        for i, w in enumerate(new.x):
            sha = content_sha256(w)
            s3_store.put(f"windows/{sha}.npy", npy_bytes(w))
            sid = f"00000000-0000-4000-8000-{i:012d}"
            s.add(
                Sample(
                    id=sid,
                    device_id="d1",
                    fleet=fleet,
                    content_sha256=sha,
                    object_key=f"windows/{sha}.npy",
                    dtype="float32",
                    shape=[32, 53],
                    captured_at=datetime.now(UTC),
                    model_version="v1",
                    predicted="normal",
                    confidence=0.5,
                    score=0.0,
                )
            )
            s.flush()
            s.add(Label(sample_id=sid, label="idv_06", source="device"))
        s.commit()
    return sessions, s3_store, registry, cfg, first


def test_round_registers_gated_version_with_lineage(
    fleet_with_uploads, mlflow_uri, fleet, tmp_path
):
    """A round learns the new fault, keeps the old ones, and lands in MLflow as version 2
    with its tags, aliases, plots and lineage; the package rebuilds from its checkpoint."""
    sessions, store, registry, cfg, first = fleet_with_uploads
    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)

    assert result.version == "v2" and result.parent == "v1"
    assert result.new_classes == ["idv_06"]
    assert result.gates["passed"], result.gates
    assert result.gates["holdout_new_recall"]["idv_06"] >= 0.9
    assert result.gates["old_f1_drop_pts"] <= cfg.max_old_f1_drop_pts

    client = MlflowClient(tracking_uri=mlflow_uri)
    name = model_name(fleet, "cpu-fp32")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == result.mlflow_version == "2"
    assert champion.tags["sha256"] == ModelPackage(result.package).sha256
    assert champion.tags["parent"] == "v1" and champion.tags["gate_verdict"] == "pass"
    run = client.get_run(champion.run_id)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == cfg.train.epochs
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion.png", "recall.png", "lineage.json", "edge_package"} <= artifacts
    lineage = json.loads(
        Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text()
    )
    assert lineage["parent"] == "v1" and len(lineage["uploads"]) > 0
    assert registry.download_package(champion.run_id) == result.package
    # An operator fetches the champion for a device's first start.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shared.cli import main; main()",
            "cloud",
            "champion",
            "--fleet",
            fleet,
            "--out",
            str(tmp_path / "champion.edgepkg"),
        ],
        env={**os.environ, "EDGELOOP_MLFLOW_TRACKING_URI": mlflow_uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "champion.edgepkg").read_bytes() == result.package

    model, classes = load_checkpoint(store, f"checkpoints/{fleet}/cpu-fp32/v2.safetensors")
    assert classes == result.class_names and model.cfg.n_classes == len(classes)
    with sessions() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    assert [r.version for r in rows] == ["v1", "v2"]


def test_mislabelled_round_is_stopped_by_the_gate(fleet_with_uploads, mlflow_uri, fleet):
    """Uploads of a fault labelled 'normal' teach the candidate to miss that fault on the
    golden set: it is registered, but not promoted, and champion stays v1."""
    sessions, store, registry, cfg, first = fleet_with_uploads
    with sessions() as s:
        for lab in s.scalars(select(Label)):
            lab.label = "normal"
        s.commit()
    cfg.holdout_fraction = 0.0
    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    name = model_name(fleet, "cpu-fp32")
    assert not result.promoted
    assert result.gates["detection_drop_pts"] > cfg.max_detection_drop_pts
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    assert client.get_model_version(name, "2").tags["gate_verdict"] == "fail"
    # With the labels put right, the next round starts again from v1, not from failed v2.
    with sessions() as s:
        for lab in s.scalars(select(Label)):
            lab.label = "idv_06"
        s.commit()
    cfg.holdout_fraction = 0.25
    again = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)
    assert (again.version, again.parent, again.promoted) == ("v3", "v1", True)


def _celery_env(pg_url, store, mlflow_uri, fleet, **extra):
    return {
        **os.environ,
        "EDGELOOP_DATABASE_URL": pg_url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": f"{HOST}:{S3_PORT}",
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": store.bucket,
        "EDGELOOP_MLFLOW_TRACKING_URI": mlflow_uri,
        "EDGELOOP_REDIS_URL": f"redis://{HOST}:{REDIS_PORT}/15",
        "EDGELOOP_CELERY_QUEUE": f"q-{fleet}",  # this test's own queue
        **extra,
    }


def _start(args, env, log):
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "cloud.tasks", *args],
        env=env,
        stdout=log.open("w"),  # noqa: SIM115 - the process keeps it
        stderr=subprocess.STDOUT,
    )


def _worker(fleet, env, log, *, pool="solo", name=None):
    """A Celery worker on this test's queue, logging to ``log``."""
    return _start(
        ["worker", "-Q", f"q-{fleet}", "--pool", pool, "--concurrency", "2" if pool == "threads"
         else "1", "--loglevel", "INFO", "--hostname", f"{name or fleet}@%h"],
        env, log,
    )  # fmt: skip


def _client(code, env, *logs, timeout=300):
    """Run ``code`` as a separate Celery client; its last stdout line, parsed as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:] + "".join(p.read_text() for p in logs)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stop(*procs):
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def _versions(sessions):
    with sessions() as s:
        return [r.version for r in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]


def test_two_triggers_at_once_start_one_round(
    fleet_with_uploads, pg_url, mlflow_uri, fleet, tmp_path
):
    """Two trigger-started rounds for one fleet sent together to a worker that could run
    both at once: one round runs, the other is skipped; one new version."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = fleet_with_uploads
    env = _celery_env(pg_url, store, mlflow_uri, fleet, EDGELOOP_TRIGGER_MIN_NEW_LABELS="10")
    worker = _worker(fleet, env, tmp_path / "worker.log", pool="threads")
    try:
        code = (
            "from cloud.tasks import retrain; import json\n"
            f"rs = [retrain.delay('{fleet}', reason='trigger {{}}'.format(i)) for i in (1, 2)]\n"
            "print(json.dumps([r.get(timeout=240) for r in rs]))"
        )
        results = _client(code, env, tmp_path / "worker.log")
    finally:
        _stop(worker)

    ran = [r for r in results if "version" in r]
    skipped = [r for r in results if "skipped" in r]
    assert len(ran) == 1 and len(skipped) == 1, results
    assert "already running" in skipped[0]["skipped"]  # turned away by the lock itself
    assert ran[0]["version"] == "v2" and "new_labels=" in ran[0]["reason"]
    assert _versions(sessions) == ["v1", "v2"]


def test_beat_policy_starts_a_gated_round_end_to_end(
    fleet_with_uploads, pg_url, mlflow_uri, fleet, tmp_path
):
    """Celery beat checks the policy every second; enough new labels start one round on the
    worker, which registers a gated version with plots and lineage in MLflow; the beats
    after it start nothing (no new labels since)."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = fleet_with_uploads
    env = _celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_TRIGGER_MIN_NEW_LABELS="10", EDGELOOP_TRIGGER_INTERVAL_S="1",
    )  # fmt: skip
    worker = _worker(fleet, env, tmp_path / "worker.log", pool="threads")
    beat = _start(
        ["beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule")],
        env, tmp_path / "beat.log",
    )  # fmt: skip
    try:
        wait_for(lambda: "v2" in _versions(sessions), timeout=240, what="a round started by beat")
        time.sleep(6)  # several more beats: nothing is due any more
    finally:
        _stop(beat, worker)

    assert _versions(sessions) == ["v1", "v2"]
    log = (tmp_path / "worker.log").read_text()
    assert "trigger for" in log and "new_labels=" in log
    client = MlflowClient(tracking_uri=mlflow_uri)
    v2 = client.get_model_version_by_alias(model_name(fleet, "cpu-fp32"), "champion")
    assert v2.tags["gate_verdict"] == "pass" and v2.tags["parent"] == "v1"
    artifacts = {a.path for a in client.list_artifacts(v2.run_id)}
    assert {"confusion.png", "recall.png", "lineage.json", "edge_package"} <= artifacts


def test_retrain_task_runs_on_a_real_worker(
    fleet_with_uploads, pg_url, mlflow_uri, fleet, tmp_path
):
    """`edgeloop.retrain` sent through Redis runs on a separate Celery worker process and
    registers v2."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = fleet_with_uploads
    env = _celery_env(pg_url, store, mlflow_uri, fleet)
    worker = _worker(fleet, env, tmp_path / "worker.log")
    try:
        code = (
            f"from cloud.tasks import retrain; r = retrain.delay('{fleet}'); "
            "import json; print(json.dumps(r.get(timeout=240)))"
        )
        result = _client(code, env, tmp_path / "worker.log")
        assert result["version"] == "v2" and result["new_classes"] == ["idv_06"]
    finally:
        _stop(worker)
    with sessions() as s:
        assert [r.version for r in s.scalars(select(ModelVersion))] == ["v1", "v2"]


def test_worker_killed_mid_round_finishes_it_once(
    fleet_with_uploads, pg_url, mlflow_uri, fleet, tmp_path
):
    """SIGKILL the worker while it trains: the round is delivered again to a new worker and
    completes once, under the version it reserved: one new version in SQL and in MLflow."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = fleet_with_uploads
    env = _celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_CELERY_VISIBILITY_TIMEOUT_S="5", EDGELOOP_ROUND_LOCK_TTL_S="4",
    )  # fmt: skip

    def worker(n):
        return _worker(fleet, env, tmp_path / f"worker{n}.log", name=f"{fleet}-{n}")

    def round_state():
        with sessions() as s:
            # The newest: the initial model's round is in the table too.
            row = s.scalars(select(Round).where(Round.fleet == fleet).order_by(Round.id.desc()))
            row = row.first()
            return None if row is None else (row.state, row.attempts, row.version)

    first = worker(1)
    code = (
        "from cloud.tasks import retrain; import json; "
        f"print(json.dumps(retrain.delay('{fleet}').id))"
    )
    task_id = _client(code, env, timeout=60)
    wait_for(lambda: round_state()[2] == "v2", timeout=120, what="the round to start")
    time.sleep(1.0)
    state_at_kill = round_state()
    first.kill()  # SIGKILL: no cleanup, no ack, the lock left to expire
    first.wait(10)
    second = worker(2)
    try:
        code = (
            "from cloud.tasks import app; import json\n"
            f"print(json.dumps(app.AsyncResult('{task_id}').get(timeout=240)))"
        )
        result = _client(code, env, tmp_path / "worker1.log", tmp_path / "worker2.log")
    finally:
        _stop(second)

    assert state_at_kill == ("train", 1, "v2"), state_at_kill  # killed mid-training
    assert result["version"] == "v2" and result["attempts"]["train"] >= 2
    assert _versions(sessions) == ["v1", "v2"]
    assert round_state()[0] == "done"
    client = MlflowClient(tracking_uri=mlflow_uri)
    registered = client.search_model_versions(f"name = '{model_name(fleet, 'cpu-fp32')}'")
    assert sorted(v.tags["edgeloop_version"] for v in registered) == ["v1", "v2"]
