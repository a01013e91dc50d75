"""The MLflow webhook receiver: a champion move on the real MLflow server reaches the
callback through a signed delivery; forged, unsigned, stale and replayed calls do not."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid

import pytest
import redis
import requests
from mlflow import MlflowClient

from cloud.rollout.webhook import (
    DELIVERY_HEADER,
    MAX_BODY,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Verifier,
    WebhookError,
    WebhookServer,
    parse_model_name,
    sign,
)
from cloud.tracking.webhooks import delete_webhook, ensure_webhook
from shared.package import model_name

from .conftest import REDIS_PORT, require, wait_for

SECRET = "s" * 8 + secrets.token_hex(16)


def alias_event(name: str, alias: str, version: str) -> bytes:
    """A delivery body as MLflow builds it (json.dumps of the envelope)."""
    doc = {
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "2026-11-30T12:00:00+00:00",
        "data": {"name": name, "alias": alias, "version": version},
    }
    return json.dumps(doc).encode()


def signed(body: bytes, *, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    delivery, stamp = str(uuid.uuid4()), str(int(time.time() if at is None else at))
    return {
        "Content-Type": "application/json",
        DELIVERY_HEADER: delivery,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, delivery, stamp, body.decode()),
    }


@pytest.fixture
def receiver(fleet):
    """A receiver on a free loopback port whose callback records this test's fleet's calls
    (MLflow delivers every alias event of the server, other tests' included)."""
    calls: list[tuple[str, str, str]] = []

    def on_alias(f: str, profile: str, version: str) -> None:
        if f == fleet:
            calls.append((f, profile, version))

    server = WebhookServer(secret=SECRET, on_alias=on_alias).start()
    yield server, calls
    server.stop()


def test_verifier_refuses_forged_unsigned_stale_and_replayed_calls():
    """Only a call signed with the secret, stamped within the tolerance and not seen before
    passes; each refusal names its reason."""
    now = [1_800_000_000.0]
    verifier = Verifier(SECRET, tolerance_s=300, clock=lambda: now[0])
    body = alias_event("edgeloop.f1.cpu-fp32", "champion", "3")
    good = signed(body, at=now[0])

    def reason(headers, payload=body):
        with pytest.raises(WebhookError) as err:
            verifier.check(headers, payload)
        return err.value.reason, err.value.status

    forged = signed(body, secret="not-the-secret-at-all", at=now[0])
    tampered = alias_event("edgeloop.f1.cpu-fp32", "champion", "4")
    unsigned = {k: v for k, v in good.items() if k != SIGNATURE_HEADER}
    stale = signed(body, at=now[0] - 301)

    assert reason(forged) == ("bad_signature", 401)
    assert reason(good, tampered) == ("bad_signature", 401)
    assert reason(unsigned) == ("unsigned", 401)
    assert reason(stale) == ("stale", 400)
    delivery = verifier.check(good, body)
    verifier.done(delivery)
    assert reason(good) == ("replayed", 400)
    now[0] += 2 * 300 + 1  # the id is forgotten, but by then its timestamp is too old
    assert reason(good) == ("stale", 400)
    with pytest.raises(ValueError):
        Verifier("short")


def test_a_replay_to_another_receiver_is_refused_through_redis(fleet):
    """Two receivers of one deployment (replicas, or one restarted) share the delivery ids
    in Redis: a delivery handled by one is refused by the other; one whose handling failed
    is let in again (MLflow's retry)."""
    from cloud.config import CloudSettings
    from cloud.rollout.webhook import RedisSeen
    from cloud.store.connect import redis_client

    require("Redis", REDIS_PORT)
    settings = CloudSettings(redis_url=f"redis://127.0.0.1:{REDIS_PORT}/15")
    shared = RedisSeen(redis_client(settings), prefix=f"test:{fleet}:")
    first, second = Verifier(SECRET, shared=shared), Verifier(SECRET, shared=shared)
    body = alias_event(f"edgeloop.{fleet}.cpu-fp32", "champion", "3")
    handled, failed = signed(body), signed(body)

    first.done(first.check(handled, body))
    first.release(first.check(failed, body))
    with pytest.raises(WebhookError) as err:
        second.check(handled, body)
    retried = second.check(failed, body)

    assert err.value.reason == "replayed"
    assert retried == failed[DELIVERY_HEADER]


def test_model_names_map_to_fleet_and_profile():
    """edgeloop.{fleet}.{profile}: a fleet may hold dots; other models are not ours."""
    assert parse_model_name(model_name("plant-a", "rpi4-int8")) == ("plant-a", "rpi4-int8")
    assert parse_model_name("edgeloop.site.b.cpu-fp32") == ("site.b", "cpu-fp32")
    assert parse_model_name("someone-elses-model") is None
    assert parse_model_name("edgeloop.nofleet") is None


def test_champion_move_in_mlflow_reaches_the_callback(receiver, mlflow_uri, fleet, caplog):
    """set_registered_model_alias(champion) on the real server → a signed delivery → the
    callback gets (fleet, profile, version); a challenger move is acknowledged and ignored;
    the receiver's own checks refuse a forged, an unsigned and a replayed call, which call
    nothing."""
    server, calls = receiver
    caplog.set_level(logging.INFO, logger="cloud.rollout.webhook")
    hook_name = f"edgeloop-test-{fleet}"
    client = MlflowClient(tracking_uri=mlflow_uri)
    name = model_name(fleet, "cpu-fp32")
    client.create_registered_model(name)
    experiment = client.create_experiment(f"edgeloop-{fleet}")
    run = client.create_run(experiment)
    for _ in range(2):
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/edge_package",
                                    run_id=run.info.run_id)  # fmt: skip
    info = ensure_webhook(tracking_uri=mlflow_uri, url=server.url, secret=SECRET, name=hook_name)
    try:
        assert (
            ensure_webhook(
                tracking_uri=mlflow_uri, url=server.url, secret=SECRET, name=hook_name
            ).webhook_id
            == info.webhook_id
        )  # again: the same webhook, not a second
        time.sleep(2.5)  # the server caches its webhook list for 2 s (scripts/services)

        client.set_registered_model_alias(name, "challenger", "2")
        client.set_registered_model_alias(name, "champion", "1")
        wait_for(lambda: calls, timeout=30, what="the champion delivery")
        wait_for(
            lambda: f"alias challenger of {name}" in caplog.text,
            timeout=30,
            what="the challenger delivery",
        )
    finally:
        delete_webhook(tracking_uri=mlflow_uri, name=hook_name)
    assert calls == [(fleet, "cpu-fp32", "1")]

    body = alias_event(name, "champion", "2")
    forged = requests.post(server.url, data=body, headers=signed(body, secret="x" * 32), timeout=10)
    unsigned = requests.post(server.url, data=body, timeout=10)
    once = signed(body)
    first = requests.post(server.url, data=body, headers=once, timeout=10)
    replayed = requests.post(server.url, data=body, headers=once, timeout=10)
    health = requests.get(f"http://{server.host}:{server.port}/healthz", timeout=10)
    huge = b"{" + b" " * MAX_BODY + b"}"
    flood = requests.post(server.url, data=iter([huge]), headers=signed(huge), timeout=10)

    assert (forged.status_code, forged.json()) == (401, {"error": "bad_signature"})
    assert (unsigned.status_code, unsigned.json()) == (401, {"error": "unsigned"})
    assert first.status_code == 200 and first.json()["status"] == "queued"
    assert (replayed.status_code, replayed.json()) == (400, {"error": "replayed"})
    assert calls == [(fleet, "cpu-fp32", "1"), (fleet, "cpu-fp32", "2")]  # the signed one only
    assert health.json() == {"status": "ok"}
    assert flood.status_code == 413  # chunked, so no length declared: capped as it arrives


def test_a_failing_callback_lets_mlflows_retry_in(fleet):
    """The broker down: the delivery is answered 503 (MLflow retries those) and not
    remembered, so the retry with the same delivery id is handled."""
    attempts: list[str] = []

    def on_alias(f: str, profile: str, version: str) -> None:
        attempts.append(version)
        if len(attempts) == 1:
            raise ConnectionError("broker down")

    server = WebhookServer(secret=SECRET, on_alias=on_alias).start()
    try:
        body = alias_event(model_name(fleet, "cpu-fp32"), "champion", "5")
        headers = signed(body)
        failed = requests.post(server.url, data=body, headers=headers, timeout=10)
        retried = requests.post(server.url, data=body, headers=headers, timeout=10)
    finally:
        server.stop()
    assert failed.status_code == 503 and retried.status_code == 200
    assert attempts == ["5", "5"]


WEBHOOK = (
    "import typer; from cloud.commands.fleet import webhook_cmd; "
    "app = typer.Typer(); app.command()(webhook_cmd); app()"
)


def test_webhook_command_queues_the_rollout_task_and_needs_a_secret(fleet, tmp_path):
    """`edgeloop cloud webhook` refuses to start without a secret; with one, a signed
    champion move puts edgeloop.rollout.on_alias (fleet, profile, version, "alias") on the
    Celery queue in Redis."""
    require("Redis", REDIS_PORT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = f"q-{fleet}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_WEBHOOK_")}
    env.update(
        EDGELOOP_REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/15",
        EDGELOOP_CELERY_QUEUE=queue,
        EDGELOOP_WEBHOOK_PORT=str(port),
    )
    cmd = [sys.executable, "-c", WEBHOOK, "--no-register"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "webhook.log").open("w")
    proc = subprocess.Popen(
        cmd, env={**env, "EDGELOOP_WEBHOOK_SECRET": SECRET}, stdout=log, stderr=subprocess.STDOUT
    )
    r = redis.Redis.from_url(f"redis://127.0.0.1:{REDIS_PORT}/15")
    try:

        def healthy() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for(healthy, timeout=60, what="the webhook command to serve")
        body = alias_event(model_name(fleet, "cpu-fp32"), "champion", "3")
        url = f"http://127.0.0.1:{port}/hooks/mlflow"
        answer = requests.post(url, data=body, headers=signed(body), timeout=10)
        queued = r.lrange(queue, 0, -1)
    finally:
        proc.terminate()
        proc.wait(10)
        r.delete(queue)

    assert refused.returncode == 2 and "EDGELOOP_WEBHOOK_SECRET" in refused.stderr
    assert answer.status_code == 200, answer.text
    assert len(queued) == 1
    message = json.loads(queued[0])
    assert message["headers"]["task"] == "edgeloop.rollout.on_alias"
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [fleet, "cpu-fp32", "3", "alias"]
