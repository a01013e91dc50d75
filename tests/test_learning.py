"""A retraining round against the real MLflow server, PostgreSQL and SeaweedFS S3; and the
same round as a Celery task on a real worker over Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sqlalchemy import select

from cloud.compress.quantization import inspect_schemes
from cloud.learn import rounds
from cloud.learn.replay import ReplayBuffer
from cloud.learn.runner import run_round, run_stage, train_initial
from cloud.learn.state import RoundConfig, Services
from cloud.learn.triggers import TriggerPolicy, check
from cloud.model.checkpoint import from_bytes
from cloud.model.configs import TrainConfig
from cloud.store.datasets import LabelledWindows, register_dataset
from cloud.store.db import Label, ModelVersion, Round, Sample, session_factory
from cloud.store.keys import dataset_key, replay_key
from cloud.store.records import register_device
from cloud.store.windows import content_sha256, npy_bytes
from cloud.tracking.registry import Registry
from shared.package import ModelPackage, model_name
from sim.tep import generate

from .conftest import (
    REDIS_PORT,
    TEP_CACHE,
    celery_env,
    require,
    wait_for,
)


def labelled(w):
    return LabelledWindows(w.x, np.array(w.class_names)[w.y])


# Plant time of the test fleet's uploads: rounds split their hold-outs by device and time
# block, so the layout is fixed (and its sides' sizes asserted where a test relies on them).
T0 = datetime(2026, 1, 4, tzinfo=UTC)
STRIDE = timedelta(seconds=576)  # the sim's windows: 16 samples of 36 s apart


def add_uploads(sessions, store, fleet, windows, label, *, first=0, device="d1", start=T0):
    """Windows stored and recorded as ingest stores them, one stride apart in plant time
    from ``start``; labelled by the device if ``label`` is given. Returns their ids."""
    ids = []
    with sessions() as s:
        for k, w in enumerate(windows):
            i = first + k
            sha = content_sha256(w)
            store.put(f"windows/{sha}.npy", npy_bytes(w))
            sid = f"00000000-0000-4000-8000-{i:012d}"
            s.add(
                Sample(
                    id=sid,
                    device_id=device,
                    fleet=fleet,
                    content_sha256=sha,
                    object_key=f"windows/{sha}.npy",
                    dtype="float32",
                    shape=list(w.shape),
                    captured_at=start + k * STRIDE,
                    model_version="v1",
                    predicted="normal",
                    confidence=0.5,
                    score=0.0,
                )
            )
            s.flush()
            if label is not None:
                s.add(Label(sample_id=sid, label=label, source="device"))
            ids.append(sid)
        s.commit()
    return ids


def seed_fleet(pg_url, store, mlflow_uri, fleet, tep_small, cfg):
    """Base and golden sets registered, an initial model, and labelled uploads of a fault
    the model has never seen (as ingest would have stored them)."""
    train, golden = tep_small
    new = generate(
        classes=["idv_06"], runs_per_class=4, seed=5, horizon_h=4.0, cache_dir=TEP_CACHE, workers=2
    )
    new_golden = generate(
        classes=["idv_06"], runs_per_class=1, seed=99, horizon_h=4.0, cache_dir=TEP_CACHE
    )
    # Other episodes again (seeds of neither base nor golden): what compression chooses on.
    validation = generate(
        classes=train.class_names, runs_per_class=1, seed=41, horizon_h=4.0,
        cache_dir=TEP_CACHE, workers=2,
    )  # fmt: skip
    register_dataset(store=store, name="base", data=labelled(train))
    register_dataset(store=store, name="validation", data=labelled(validation))
    gold = LabelledWindows(
        np.concatenate([golden.x, new_golden.x]),
        np.concatenate([labelled(golden).labels, np.array(["idv_06"] * len(new_golden))]),
    )
    register_dataset(store=store, name="golden", data=gold)
    sessions = session_factory(pg_url)
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    first = train_initial(sessions=sessions, store=store, registry=registry, cfg=cfg)
    with sessions() as s:
        for device in ("d1", "d2"):
            register_device(session=s, device_id=device, fleet=fleet, profile=cfg.profile)
    half = len(new.x) // 2  # two runs on each plant, back to back
    add_uploads(sessions, store, fleet, new.x[:half], "idv_06", device="d1")
    add_uploads(sessions, store, fleet, new.x[half:], "idv_06", first=half, device="d2")
    return sessions, store, registry, cfg, first


@pytest.fixture
def fleet_with_uploads(pg_url, s3_store, mlflow_uri, fleet, tep_small):
    cfg = RoundConfig(fleet=fleet, train=TrainConfig(epochs=15, lr=2e-3))
    return seed_fleet(pg_url, s3_store, mlflow_uri, fleet, tep_small, cfg)


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
    assert result.gates["old_f1_drop_pts"] <= cfg.max_old_f1_drop_pts == 1.0
    # The hold-out: whole time blocks, a window's gap from what was learnt (this layout's
    # sizes, fixed by the plant times); and the golden set's own episodes of the new fault.
    trained = _train_output(sessions, fleet, "v2")
    assert (len(trained["fit"]), len(trained["validation"]), len(trained["holdout"])) == (30, 7, 12)
    assert trained["lineage"]["gap_windows"] == 7
    assert _evaluate_output(sessions, fleet, "v2")["metrics"]["golden_recall_idv_06"] >= 0.9

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

    model, classes = from_bytes(store.get(f"checkpoints/{fleet}/cpu-fp32/v2.safetensors"))
    assert classes == result.class_names and model.cfg.n_classes == len(classes)
    with sessions() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    assert [r.version for r in rows] == ["v1", "v2"]


def test_the_next_round_learns_from_what_champion_names(
    fleet_with_uploads, mlflow_uri, fleet, tiny_package
):
    """A newer version passed its gates but `champion` stayed on v1 (an operator moved it
    back, or never promoted): the next round's parent is v1, the model the fleet runs."""
    from tests.fleetkit import package_variant, register_package

    sessions, store, registry, cfg, first = fleet_with_uploads
    register_package(
        sessions=sessions, store=store, registry=registry, fleet=fleet,
        package=package_variant(tiny_package, "v2"),
    )  # fmt: skip
    name = model_name(fleet, "cpu-fp32")
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_model_version_by_alias(name, "champion").tags["edgeloop_version"] == "v1"

    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)

    assert (result.version, result.parent) == ("v3", "v1")


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
    assert any("detection rate fell" in reason for reason in result.gates["failed"])
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


def _train_output(sessions, fleet, version):
    with sessions() as s:
        row = s.scalar(select(Round).where(Round.fleet == fleet, Round.version == version))
        return row.stages["train"]["output"]


def _evaluate_output(sessions, fleet, version):
    with sessions() as s:
        row = s.scalar(select(Round).where(Round.fleet == fleet, Round.version == version))
        return row.stages["evaluate"]["output"]


def test_a_round_that_misses_a_goal_is_registered_but_not_promoted(
    fleet_with_uploads, mlflow_uri, fleet
):
    """The gates are the goals (new-class recall ≥ 0.9, old classes' macro-F1 drop ≤ 1 pt):
    a round trained too briefly to learn the new fault misses the first, one whose training
    diverged misses the second; both are registered, neither is promoted."""
    sessions, store, registry, cfg, first = fleet_with_uploads
    assert (cfg.min_new_recall, cfg.max_old_f1_drop_pts) == (0.9, 1.0)
    client = MlflowClient(tracking_uri=mlflow_uri)
    name = model_name(fleet, "cpu-fp32")

    cfg.train = TrainConfig(epochs=1, lr=1e-4)
    brief = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)
    cfg.train = TrainConfig(epochs=3, lr=1.0)
    diverged = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)

    assert brief.gates["holdout_new_recall"]["idv_06"] < 0.9
    assert any("held-out recall of idv_06" in r for r in brief.gates["failed"])
    assert diverged.gates["old_f1_drop_pts"] > 1.0
    assert any("old classes' macro-F1 fell" in r for r in diverged.gates["failed"])
    for result, mlflow_version in ((brief, "2"), (diverged, "3")):
        assert not result.promoted and result.parent == "v1"
        assert client.get_model_version(name, mlflow_version).tags["gate_verdict"] == "fail"
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def test_round_pseudo_labels_above_the_bar_and_replays_a_reservoir(
    fleet_with_uploads, fleet, tep_small
):
    """Unlabelled uploads of classes the teacher knows: those it is sure of get its label
    (source teacher, with its confidence) and are learnt from, and the triggers do not count
    them as new. The round replays its parent's class-balanced reservoir; its own reservoir
    is the parent's plus what it learnt, at most replay_per_class windows a class."""
    sessions, store, registry, cfg, first = fleet_with_uploads
    extra = generate(
        classes=["normal", "idv_01"], runs_per_class=1, seed=7, horizon_h=4.0, cache_dir=TEP_CACHE
    )
    # The next day on plant d1.
    ids = add_uploads(sessions, store, fleet, extra.x, None, first=10_000, start=T0 + timedelta(1))
    truth = dict(zip(ids, np.array(extra.class_names)[extra.y], strict=True))
    cfg.pseudo_label_min_confidence = 0.9

    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)

    with sessions() as s:
        by_teacher = s.scalars(select(Label).where(Label.source == "teacher")).all()
        due = check(
            session=s,
            fleet=fleet,
            profile=cfg.profile,
            policy=TriggerPolicy(min_new_labels=1, anomaly_rate_jump=1.0, max_age_h=None),
            now=datetime.now(UTC),
        )
    assert result.promoted, result.gates
    teacher, _ = from_bytes(store.get(f"checkpoints/{fleet}/cpu-fp32/v1.safetensors"))
    with torch.no_grad():
        sure = torch.softmax(teacher(torch.as_tensor(extra.x)), 1).max(1).values.numpy() >= 0.9
    # Exactly the windows the teacher is sure of, and some of them.
    assert {lab.sample_id for lab in by_teacher} == set(np.array(ids)[sure]) and sure.any()
    assert all(lab.confidence >= 0.9 for lab in by_teacher)
    agree = np.mean([lab.label == truth[lab.sample_id] for lab in by_teacher])
    assert agree >= 0.9, agree
    trained = _train_output(sessions, fleet, "v2")
    assert trained["lineage"]["pseudo_labelled"] == len(by_teacher)
    learnt = dict(trained["fit"])  # sample id → the label it was trained with
    # Learnt where they fall on the training side; never evidence (held out or validation):
    # there they are left out, in the gap, with the windows beside them.
    by_side = [lab.sample_id in learnt for lab in by_teacher]
    assert trained["lineage"]["labels_by_source"]["teacher"] == sum(by_side) > 0
    evidence = {i for i, _ in trained["holdout"] + trained["validation"]}
    assert not {lab.sample_id for lab in by_teacher} & evidence
    assert learnt == dict(zip(learnt, _labels(sessions, list(learnt)), strict=True))
    assert due.new_labels == 0 and not due.reasons
    # Labels written after the round: a teacher's never counts for the triggers, a
    # device's does.
    unsure = [i for i, ok in zip(ids, sure, strict=True) if not ok]
    counted = []
    for sample_id, source in zip(unsure, ("teacher", "device"), strict=False):
        with sessions() as s:
            s.add(Label(sample_id=sample_id, label="normal", source=source, confidence=0.95))
            s.commit()
            policy = TriggerPolicy(min_new_labels=1)
            now = datetime.now(UTC)
            counted.append(check(session=s, fleet=fleet, profile=cfg.profile, policy=policy,
                                 now=now).new_labels)  # fmt: skip
    assert counted == [0, 1]

    parent = ReplayBuffer.from_json(store.get(replay_key(fleet, cfg.profile, "v1")))
    mine = ReplayBuffer.from_json(store.get(replay_key(fleet, cfg.profile, "v2")))
    assert [tuple(p) for p in trained["replay"]] == parent.windows()
    assert {c: len(v) for c, v in parent.items.items()} == {
        c: min(cfg.replay_per_class, n) for c, n in parent.seen.items()
    }
    expected = parent.copy().offer_all((f"sample:{i}", c) for i, c in learnt.items())
    assert mine.windows() == expected.windows()
    assert all(len(v) <= cfg.replay_per_class for v in mine.items.values())
    assert "idv_06" in mine.items and mine.seen["idv_06"] == sum(
        c == "idv_06" for c in learnt.values()
    )


def _labels(sessions, ids):
    with sessions() as s:
        best = {}
        for lab in s.scalars(select(Label).where(Label.sample_id.in_(ids))):
            if lab.sample_id not in best or lab.source != "teacher":
                best[lab.sample_id] = lab.label
    return [best[i] for i in ids]


def test_round_recompresses_a_transformer_teacher_for_its_profile(
    pg_url, s3_store, mlflow_uri, fleet, tep_small
):
    """A fleet of rpi4-int8 devices with a PatchTST teacher: each round's recompress stage
    runs the compression pipeline, and the gates judge the INT8 package it made."""
    cfg = RoundConfig(
        fleet=fleet,
        profile="rpi4-int8",
        train=TrainConfig(epochs=15, lr=2e-3),
        distill_epochs=10,
        teacher={"backbone": "patchtst", "d_model": 32, "layers": 2, "heads": 2, "ffn": 64},
    )
    sessions, store, registry, cfg, first = seed_fleet(
        pg_url, s3_store, mlflow_uri, fleet, tep_small, cfg
    )
    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)

    with sessions() as s:
        row = s.scalar(select(Round).where(Round.fleet == fleet, Round.version == "v2"))
        comp = row.stages["recompress"]["output"]["compression"]
    pkg = ModelPackage(result.package)
    assert pkg.manifest.profile == "rpi4-int8" and pkg.manifest.parent == "v1"
    quant = pkg.manifest.metadata["compression"]["quantization"]
    assert quant and {scheme for _, _, scheme in quant} == {"int8"}
    # What the manifest says each weight got, read back from the packaged graph's bytes
    # (after the packaging renamed the graph's other tensors).
    assert inspect_schemes(pkg.graph, [w for _, w, _ in quant]) == {w: q for _, w, q in quant}
    assert comp["kept_layers"] and comp["edge_bytes"] == len(result.package)
    # The round tried a package close to v1's (from v1's stored student) and shipped it
    # only if it passed validation and made the smaller delta (cloud.learn.close).
    close = comp["delta_friendly"]
    assert close["parent"] == "v1" and close["ladder"], close
    assert store.exists(f"students/{fleet}/rpi4-int8/v2.safetensors")
    if close["strategy"] == "close":
        assert close["delta_bytes_close"] < close["delta_bytes_unconstrained"]
        assert close["ladder"][-1]["passed"]
    else:
        assert not close["ladder"][-1]["passed"] or close["why"] == "its delta is not smaller"
    assert result.gates["passed"], result.gates
    assert result.gates["holdout_new_recall"]["idv_06"] >= 0.9
    model, classes = from_bytes(store.get(f"checkpoints/{fleet}/rpi4-int8/v2.safetensors"))
    assert type(model).__name__ == "SensorTransformer" and classes == result.class_names
    client = MlflowClient(tracking_uri=mlflow_uri)
    v2 = client.get_model_version_by_alias(model_name(fleet, "rpi4-int8"), "champion")
    assert v2.tags["profile"] == "rpi4-int8" and v2.tags["sha256"] == pkg.sha256


def test_register_after_a_crash_past_mlflow_records_without_registering_again(
    fleet_with_uploads, mlflow_uri, fleet
):
    """A worker that died after MLflow registered v2 but before v2 was recorded here: the
    register stage, run again, finds v2 in the registry by its tags and only records it;
    MLflow keeps one v2."""
    sessions, store, registry, cfg, first = fleet_with_uploads
    result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)
    with sessions() as s:  # the state such a crash leaves: registered, not recorded
        s.delete(s.scalar(select(ModelVersion).where(ModelVersion.version == "v2")))
        row = s.scalar(select(Round).where(Round.fleet == fleet, Round.version == "v2"))
        row.stages = {**row.stages, "register": {"attempts": 1}}
        row.state = "register"
        s.commit()
        round_id = row.id

    svc = Services(sessions, store, registry)
    # Had the round been trained again since (another package under the same version),
    # recording MLflow's v2 for it would be a lie: it stops and says so.
    with sessions() as s:
        row = s.get(Round, round_id)
        real = row.stages
        fake = {**real, "recompress": {**real["recompress"]}}
        fake["recompress"]["output"] = {**real["recompress"]["output"], "sha256": "0" * 64}
        row.stages = fake
        s.commit()
    with pytest.raises(RuntimeError, match="another package"):
        run_stage(svc, round_id, "register")
    with sessions() as s:
        row = s.get(Round, round_id)
        row.stages = {**real, "register": {"attempts": 1}}
        row.state = "register"
        s.commit()

    out = run_stage(svc, round_id, "register")

    client = MlflowClient(tracking_uri=mlflow_uri)
    registered = client.search_model_versions(f"name = '{model_name(fleet, 'cpu-fp32')}'")
    assert sorted(v.tags["edgeloop_version"] for v in registered) == ["v1", "v2"]
    assert out == {"mlflow_version": result.mlflow_version, "promoted": True}
    with sessions() as s:
        v2 = s.scalar(select(ModelVersion).where(ModelVersion.version == "v2"))
        row = s.get(Round, round_id)
    assert v2.sha256 == ModelPackage(result.package).sha256 and v2.gates["passed"]
    assert row.state == "done" and row.stages["register"]["attempts"] == 2
    assert row.result["version"] == "v2" and row.result["promoted"]


def test_a_round_failed_while_registering_resumes_and_one_failing_for_good_starts_afresh(
    pg_url,
):
    """The next reservation of a round that failed at register keeps its finished stages
    and the settings they ran with (MLflow may hold its package); after repeated register
    failures it starts afresh with today's settings; one that failed earlier always does."""
    sessions = session_factory(pg_url)
    done = {"done": True, "attempts": 1, "output": {}}
    with sessions() as s:
        s.add(
            Round(
                task_id="t1", fleet="f", profile="cpu-fp32", version="v1", state="failed",
                reason="r", config={"fleet": "f", "replay_per_class": 7},
                stages={"train": done, "recompress": done, "evaluate": done,
                        "register": {"attempts": 1, "error": "MLflow away"}},
            )
        )  # fmt: skip
        s.commit()
    row = rounds.reserve(
        sessions=sessions, task_id="t2", fleet="f", profile="cpu-fp32", reason="again",
        config={"fleet": "f", "replay_per_class": 99},
    )  # fmt: skip
    assert (row.version, row.state, row.config["replay_per_class"]) == ("v1", "register", 7)
    assert set(row.stages) == {"train", "recompress", "evaluate", "register"}
    with sessions() as s:
        r = s.get(Round, row.id)
        r.state, r.stages = "failed", {**r.stages, "register": {"attempts": 3, "error": "x"}}
        s.commit()
    row = rounds.reserve(
        sessions=sessions, task_id="t3", fleet="f", profile="cpu-fp32", reason="again",
        config={"fleet": "f", "replay_per_class": 99},
    )  # fmt: skip
    assert (row.state, row.stages, row.config["replay_per_class"]) == ("train", {}, 99)


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
    # v1's round ran a moment ago: no interval between rounds here (tests/test_triggers).
    env = celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_TRIGGER_MIN_NEW_LABELS="10", EDGELOOP_TRIGGER_MIN_INTERVAL_H="0",
    )  # fmt: skip
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
    env = celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_TRIGGER_MIN_NEW_LABELS="10", EDGELOOP_TRIGGER_INTERVAL_S="1",
        EDGELOOP_TRIGGER_MIN_INTERVAL_H="0",  # v1's round ran a moment ago
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
    env = celery_env(pg_url, store, mlflow_uri, fleet)
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
    env = celery_env(
        pg_url, store, mlflow_uri, fleet,
        EDGELOOP_CELERY_VISIBILITY_TIMEOUT_S="5", EDGELOOP_ROUND_LOCK_TTL_S="4",
        # Training long enough (seconds, not a fraction of one) to be killed in the middle
        # of it on any machine: the first progress line comes before the first epoch.
        EDGELOOP_ROUND_EPOCHS="200",
    )  # fmt: skip

    def worker(n):
        return _worker(fleet, env, tmp_path / f"worker{n}.log", name=f"{fleet}-{n}")

    def round_state():
        with sessions() as s:
            # The newest: the initial model's round is in the table too.
            row = s.scalars(select(Round).where(Round.fleet == fleet).order_by(Round.id.desc()))
            row = row.first()
            return None if row is None else (row.state, row.attempts, row.version)

    def train_progress():
        with sessions() as s:
            row = s.scalars(
                select(Round).where(Round.fleet == fleet, Round.version == "v2")
            ).first()
            return None if row is None else (row.stages or {}).get("train", {}).get("progress")

    first = worker(1)
    code = (
        "from cloud.tasks import retrain; import json; "
        f"print(json.dumps(retrain.delay('{fleet}').id))"
    )
    task_id = _client(code, env, timeout=60)
    # Killed once the train stage reports progress, not a fixed second after the round
    # was reserved: a slow start would otherwise be killed before training began.
    wait_for(lambda: train_progress() is not None, timeout=120, what="training to start")
    time.sleep(0.5)
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


def test_a_failed_stage_is_resumed_where_it_stopped(
    fleet_with_uploads, pg_url, mlflow_uri, fleet, tmp_path
):
    """The round runs as a chain of stage tasks on a worker. With the golden set gone it
    fails at evaluate: `edgeloop cloud rounds` shows train and recompress done and the
    error. With the golden set back, `edgeloop retrain --resume` runs evaluate and register
    only, and follows the round to its new version."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = fleet_with_uploads
    golden = store.get(dataset_key("golden"))
    store.delete(dataset_key("golden"))
    env = celery_env(pg_url, store, mlflow_uri, fleet)
    worker = _worker(fleet, env, tmp_path / "worker.log")

    def edgeloop(*args):
        out = subprocess.run(
            [sys.executable, "-c", "from shared.cli import main; main()", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return out.returncode, out.stdout + out.stderr

    try:
        rc, failed = edgeloop("retrain", "--fleet", fleet)
        rc_list, listing = edgeloop("cloud", "rounds", "--fleet", fleet)
        store.put(dataset_key("golden"), golden)
        with sessions() as s:
            row = s.scalars(select(Round).where(Round.fleet == fleet).order_by(Round.id.desc()))
            round_id = row.first().id
        rc_resume, resumed = edgeloop("retrain", "--fleet", fleet, "--resume", str(round_id))
    finally:
        _stop(worker)

    assert rc == 1 and "round failed" in failed and "--resume" in failed, failed
    assert rc_list == 0 and "train✓×1" in listing and "recompress✓×1" in listing, listing
    assert "evaluate✗×1" in listing and "error in evaluate" in listing, listing
    assert rc_resume == 0 and "v2 (parent v1" in resumed and "promoted" in resumed, resumed
    with sessions() as s:
        row = s.get(Round, round_id)
        attempts = {k: v["attempts"] for k, v in row.stages.items()}
    assert row.state == "done" and row.version == "v2"
    assert attempts == {"train": 1, "recompress": 1, "evaluate": 2, "register": 1}
    assert _versions(sessions) == ["v1", "v2"]
