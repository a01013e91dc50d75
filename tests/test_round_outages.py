"""A learning round through outages: its database cut away under a stage (a TCP proxy in
front of the shared PostgreSQL, cut and restored; nothing shared is stopped) and the round
still finishes, once; what counts as an outage, and what fails a round at once."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from cloud.learn import rounds
from cloud.learn.runner import outage_retry_in, run_stage
from cloud.learn.state import STAGES, RoundConfig, Services
from cloud.model.configs import TrainConfig
from cloud.store.db import ModelVersion, Round, session_factory
from cloud.store.keys import dataset_key
from cloud.store.objects import ObjectNotFound, S3ObjectStore, StorageError
from cloud.store.outages import is_transient
from shared.package import model_name
from tests.proxy import TcpProxy

from .conftest import (
    HOST,
    PG_PORT,
    REDIS_PORT,
    S3_KEY,
    S3_PORT,
    S3_SECRET,
    celery_env,
    require,
    wait_for,
)
from .test_learning import _stop, _worker, seed_fleet

pytestmark = pytest.mark.services
ROUND = RoundConfig(fleet="", train=TrainConfig(epochs=10, lr=2e-3))  # a line at 5 and 10


@pytest.fixture
def seeded(pg_url, s3_store, mlflow_uri, fleet, tep_small):
    """v1 trained briefly (these rounds need to run, not to pass their gates) and the
    labelled uploads of a new fault; a TCP proxy in front of the fleet's database."""
    cfg = RoundConfig(fleet=fleet, train=TrainConfig(epochs=2, lr=2e-3))
    sessions, store, registry, _, _ = seed_fleet(pg_url, s3_store, mlflow_uri, fleet, tep_small,
                                                 cfg)  # fmt: skip
    proxy = TcpProxy(PG_PORT).start()
    via = pg_url.replace(f":{PG_PORT}/", f":{proxy.port}/")
    yield sessions, store, registry, proxy, via
    proxy.stop()


def reserve(sessions, fleet, task_id):
    cfg = RoundConfig(fleet=fleet, train=ROUND.train)
    return rounds.reserve(sessions=sessions, task_id=task_id, fleet=fleet, profile=cfg.profile,
                          reason="manual", config=cfg.to_dict())  # fmt: skip


def send_round(round_id: int, env: dict) -> None:
    """Send round ``round_id``'s chain to the workers, from a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", "from cloud.tasks import round_chain; "
         f"print(round_chain({round_id}).delay().id)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


def state(sessions, round_id: int) -> str:
    with sessions() as s:
        return s.get(Round, round_id).state


def one_v2(sessions, mlflow_uri, fleet):
    """v2 whole, once: one row, one MLflow version, the same package."""
    with sessions() as s:
        versions = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))
    registered = MlflowClient(tracking_uri=mlflow_uri).search_model_versions(
        f"name = '{model_name(fleet, 'cpu-fp32')}'"
    )
    tagged = sorted(v.tags["edgeloop_version"] for v in registered)
    v2 = next(v for v in registered if v.tags["edgeloop_version"] == "v2")
    assert [v.version for v in versions] == ["v1", "v2"] and tagged == ["v1", "v2"]
    assert v2.tags["sha256"] == versions[1].sha256


def test_training_rides_out_its_database_going_away(seeded, mlflow_uri, fleet, caplog):
    """The database is cut for 3 s at the fifth epoch's progress line: that line (and any
    during the outage) is skipped, training goes on, its output waits for the database; the
    round finishes with each stage run once and v2 registered once."""
    sessions, store, registry, proxy, via = seeded
    row = reserve(sessions, fleet, "outage-in-process")
    outage = {}

    def say(message: str) -> None:
        if "epoch 5/" in message and not outage:
            proxy.stop()
            outage["cut"] = time.monotonic()
            threading.Timer(3.0, proxy.start).start()

    svc = Services(session_factory(via), store, registry)
    with caplog.at_level(logging.WARNING, logger="cloud.learn.runner"):
        for stage in STAGES:
            run_stage(svc, row.id, stage, say=say, patience_s=60)

    assert outage, "no epoch line: the cut never happened"
    assert "progress not written (OperationalError)" in caplog.text
    with sessions() as s:
        done = s.get(Round, row.id)
    assert done.state == "done", done.result
    assert {k: v["attempts"] for k, v in done.stages.items()} == dict.fromkeys(STAGES, 1)
    one_v2(sessions, mlflow_uri, fleet)


def test_a_stage_task_waits_an_outage_out_on_a_worker(seeded, pg_url, mlflow_uri, fleet,
                                                      tmp_path):  # fmt: skip
    """A round's chain sent to a real worker whose database is unreachable: the train task
    meets the outage, is sent again with backoff (1, 2, 4 s …), and once the database is
    back the round finishes by itself, each stage run once, v2 registered once."""
    require("Redis", REDIS_PORT)
    sessions, store, _, proxy, via = seeded
    env = celery_env(via, store, mlflow_uri, fleet, EDGELOOP_ROUND_OUTAGE_PATIENCE_S="120")
    log = tmp_path / "worker.log"
    worker = _worker(fleet, env, log, pool="threads")
    row = reserve(sessions, fleet, "outage-worker")
    try:
        wait_for(lambda: "ready." in log.read_text(), 120, what="the worker")
        proxy.stop()
        send_round(row.id, env)
        wait_for(lambda: log.read_text().count("met an outage") >= 2, 60, what="two retries")
        proxy.start()
        wait_for(lambda: state(sessions, row.id) in ("done", "failed"), 240,
                 what="the round to end")  # fmt: skip
    finally:
        _stop(worker)
    text = log.read_text()
    with sessions() as s:
        done = s.get(Round, row.id)
    assert done.state == "done", (done.result, text[-3000:])
    assert {k: v["attempts"] for k, v in done.stages.items()} == dict.fromkeys(STAGES, 1)
    assert f"round {row.id} train met an outage (OperationalError" in text
    assert "raised unexpected" not in text
    one_v2(sessions, mlflow_uri, fleet)


def test_an_outage_past_the_patience_fails_the_round_with_its_reason(
    seeded, pg_url, mlflow_uri, fleet, tmp_path
):
    """The object store cut away for good, with a patience of 4 s: the train task is tried
    again with backoff, then the round is failed, its reason the outage."""
    require("Redis", REDIS_PORT)
    sessions, store, _, _, _ = seeded
    s3 = TcpProxy(S3_PORT).start()
    env = celery_env(pg_url, store, mlflow_uri, fleet, EDGELOOP_ROUND_OUTAGE_PATIENCE_S="4",
                     EDGELOOP_S3_ENDPOINT=f"{HOST}:{s3.port}")  # fmt: skip
    log = tmp_path / "worker.log"
    worker = _worker(fleet, env, log, pool="threads")
    row = reserve(sessions, fleet, "outage-for-good")
    try:
        wait_for(lambda: "ready." in log.read_text(), 120, what="the worker")
        s3.stop()
        send_round(row.id, env)
        wait_for(lambda: state(sessions, row.id) == "failed", 90, what="the round to fail")
    finally:
        _stop(worker)
        s3.stop()
    with sessions() as s:
        failed = s.get(Round, row.id)
    text = log.read_text()
    assert failed.result["stage"] == "train", failed.result
    assert failed.result["error"].startswith("outage outlasted round_outage_patience_s (4 s)")
    assert "StorageError" in failed.result["error"]
    assert text.count(f"round {row.id} train met an outage (StorageError") >= 2, text[-3000:]


def test_a_stage_that_fails_for_its_own_reason_fails_the_round_at_once(seeded, fleet):
    """The golden set gone is no outage: evaluate fails at its first try, the round is
    failed with the reason, and no retry is asked for."""
    sessions, store, registry, _, _ = seeded
    row = reserve(sessions, fleet, "not-an-outage")
    svc = Services(sessions, store, registry)
    for stage in ("train", "recompress"):
        run_stage(svc, row.id, stage)
    store.delete(dataset_key("golden"))
    t0 = time.monotonic()
    with pytest.raises(ObjectNotFound) as failed:
        run_stage(svc, row.id, "evaluate", patience_s=60)
    took = time.monotonic() - t0
    with sessions() as s:
        done = s.get(Round, row.id)
    assert done.state == "failed" and done.result["stage"] == "evaluate"
    assert "ObjectNotFound" in done.result["error"] and "golden" in done.result["error"]
    assert outage_retry_in(failed.value, retries=0, waited_s=0, patience_s=60) is None
    assert took < 30, took  # no waiting: the failure is the stage's own


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_what_counts_as_an_outage(pg_url, s3_store, monkeypatch):
    """Real errors of unreachable services are outages; a missing object, a file not
    found, a bad value are not; an outage past the patience is not waited out."""
    from minio.error import S3Error
    from mlflow import MlflowClient as Client
    from urllib3 import HTTPResponse

    port = closed_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = session_factory(pg_url.replace(f":{PG_PORT}/", f":{port}/"))
    outages = []
    with pytest.raises(OperationalError) as db, down() as s:
        s.execute(select(1))
    outages.append(db.value)
    with pytest.raises(StorageError) as s3:
        S3ObjectStore(endpoint=f"{HOST}:{port}", access_key=S3_KEY, secret_key=S3_SECRET,
                      bucket=s3_store.bucket)  # fmt: skip
    outages.append(s3.value)
    with pytest.raises(Exception) as tracking:  # noqa: PT011 - MLflow wraps what it met
        Client(tracking_uri=f"http://{HOST}:{port}").search_registered_models()
    outages.append(tracking.value)
    # SeaweedFS re-electing its master after a restart answers 500 InternalError "please
    # try again" for seconds (the chaos suite met it); a refused key is no outage.
    busy = S3Error(HTTPResponse(status=500), "InternalError", "please try again", "/k", "r", "h")
    refused = S3Error(HTTPResponse(status=403), "AccessDenied", "denied", "/k", "r", "h")
    outages.append(busy)
    with pytest.raises(ObjectNotFound) as missing:
        s3_store.get("windows/absent.npy")
    not_outages = [missing.value, refused, FileNotFoundError(2, "no such file"), ValueError("x")]

    assert [is_transient(e) for e in outages] == [True] * 4, outages
    assert [is_transient(e) for e in not_outages] == [False] * 4, not_outages
    waits = [outage_retry_in(db.value, retries=r, waited_s=0, patience_s=300) for r in range(7)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert outage_retry_in(db.value, retries=3, waited_s=298, patience_s=300) == 2
    assert outage_retry_in(db.value, retries=3, waited_s=300, patience_s=300) is None
