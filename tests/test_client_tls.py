"""Each client setting reaches the wire: our PostgreSQL, Redis, S3 and MLflow clients, made
the way the services make them (cloud.store.db, cloud.store.connect, open_store,
cloud.tracking), talk to a TLS server in the test that records the handshake (version,
SNI, client certificate) and the credentials they present. Given the wrong CA, each refuses
the server before it sends a credential; a silent server is given up on within the
configured timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cloud.config import CloudSettings
from tests.conftest import ROOT
from tests.tlsrecorder import TestCA, TLSRecorder, http, postgres, redis, redis_silent, silent

TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


class CAs:
    def __init__(self, directory):
        self.right = TestCA(directory / "right")
        self.wrong = TestCA(directory / "wrong", name="a CA nobody configured")
        self.client_cert, self.client_key = self.right.issue("edgeloop-worker", client=True)


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    return CAs(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def clean_mlflow_env():
    """MLflow's variables are process-wide: the ones a test's settings set are removed
    after it."""
    from cloud.tracking.connect import apply_mlflow_settings

    yield
    apply_mlflow_settings(CloudSettings(_env_file=None))


def settings(**fields: object) -> CloudSettings:
    return CloudSettings(_env_file=None, **fields)  # type: ignore[arg-type]


# --- PostgreSQL --------------------------------------------------------------------------


def pg_settings(port: int, ca_file, **more: object) -> CloudSettings:
    return settings(
        database_url=f"postgresql://edgeloop-worker@localhost:{port}/plant",
        database_sslmode="verify-full",
        database_sslrootcert=ca_file,
        **more,
    )


def test_postgres_verifies_the_server_and_presents_its_certificate(cas):
    """The engine of cloud.store.db asks for TLS, checks the server's certificate against
    EDGELOOP_DATABASE_SSLROOTCERT and its host name (SNI sent), shows the client
    certificate, and only then sends its user and database."""
    from sqlalchemy.exc import OperationalError

    from cloud.store.db import make_engine

    with TLSRecorder(cas.right, postgres) as rec:
        s = pg_settings(
            rec.port,
            cas.right.ca_file,
            database_sslcert=cas.client_cert,
            database_sslkey=cas.client_key,
        )
        engine = make_engine(s.resolved_database_url, s)
        with pytest.raises(OperationalError, match="recorded by the test's TLS recorder"):
            engine.connect()
        engine.dispose()
    seen = rec.seen[-1]
    assert seen.handshake_error is None
    assert seen.tls_version in TLS_VERSIONS
    assert seen.sni == "localhost"
    assert seen.client_cert_cn == "edgeloop-worker"
    assert seen.credentials["user"] == "edgeloop-worker"
    assert seen.credentials["database"] == "plant"


def test_postgres_refuses_a_server_its_ca_did_not_sign(cas):
    """With another CA as EDGELOOP_DATABASE_SSLROOTCERT the handshake fails on our side and
    no user name leaves the process."""
    from sqlalchemy.exc import OperationalError

    from cloud.store.db import make_engine

    with TLSRecorder(cas.right, postgres) as rec:
        s = pg_settings(rec.port, cas.wrong.ca_file)
        engine = make_engine(s.resolved_database_url, s)
        with pytest.raises(OperationalError, match="certificate verify failed"):
            engine.connect()
        engine.dispose()
    assert rec.seen and all(seen.credentials == {} for seen in rec.seen)
    assert any("unknown ca" in (seen.handshake_error or "").lower() for seen in rec.seen)


def test_postgres_gives_up_on_a_silent_server_after_the_connect_timeout(cas):
    """EDGELOOP_DATABASE_CONNECT_TIMEOUT_S bounds the wait for a server that never answers
    (libpq's smallest is 2 s)."""
    from sqlalchemy.exc import OperationalError

    from cloud.store.db import make_engine

    with TLSRecorder(cas.right, silent) as rec:
        s = settings(
            database_url=f"postgresql://edgeloop@127.0.0.1:{rec.port}/plant",
            database_connect_timeout_s=2,
        )
        engine = make_engine(s.resolved_database_url, s)
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="timeout"):
            engine.connect()
        took = time.monotonic() - t0
        engine.dispose()
    assert 1.5 < took < 6, took


# --- Redis -------------------------------------------------------------------------------


def redis_settings(port: int, ca_file, **more: object) -> CloudSettings:
    return settings(
        redis_url=f"rediss://localhost:{port}/0",
        redis_username="edgeloop-worker",
        redis_password="redis-password-from-a-vault",
        redis_ca_file=ca_file,
        **more,
    )


def test_redis_client_verifies_the_server_and_authenticates(cas):
    """redis_client (round locks, webhook delivery ids) speaks TLS, checks the server
    against EDGELOOP_REDIS_CA_FILE, shows the client certificate, and sends AUTH with the
    configured user and password."""
    from cloud.store.connect import redis_client

    with TLSRecorder(cas.right, redis) as rec:
        s = redis_settings(
            rec.port,
            cas.right.ca_file,
            redis_certfile=cas.client_cert,
            redis_keyfile=cas.client_key,
        )
        assert redis_client(s).ping() is True
    seen = rec.seen[-1]
    assert seen.tls_version in TLS_VERSIONS
    assert seen.sni == "localhost"
    assert seen.client_cert_cn == "edgeloop-worker"
    assert seen.credentials == {
        "username": "edgeloop-worker",
        "password": "redis-password-from-a-vault",
    }
    assert ("PING", "") in seen.requests  # after the credentials


def test_celery_broker_and_backend_verify_and_authenticate(cas, tmp_path):
    """The worker's Celery app (cloud.tasks, configured by environment as in production)
    reaches Redis over TLS with the CA and AUTH, for its broker and its result backend."""
    with TLSRecorder(cas.right, redis) as rec:
        env = {
            **os.environ,
            "EDGELOOP_REDIS_URL": f"rediss://localhost:{rec.port}/0",
            "EDGELOOP_REDIS_USERNAME": "edgeloop-worker",
            "EDGELOOP_REDIS_PASSWORD": "redis-password-from-a-vault",
            "EDGELOOP_REDIS_CA_FILE": str(cas.right.ca_file),
            "EDGELOOP_HOME": str(tmp_path),
        }
        code = (
            "from cloud.tasks import app\n"
            "with app.connection_for_write() as conn:\n"
            "    conn.ensure_connection(max_retries=1)\n"
            "    conn.default_channel.client.ping()\n"
            "app.backend.client.ping()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    authenticated = [s for s in rec.seen if s.credentials]
    assert len(authenticated) >= 2  # the broker's connection and the backend's
    for seen in authenticated:
        assert seen.tls_version in TLS_VERSIONS and seen.sni == "localhost"
        assert seen.credentials["password"] == "redis-password-from-a-vault"


def test_redis_refuses_a_server_its_ca_did_not_sign(cas):
    """With the wrong EDGELOOP_REDIS_CA_FILE the client refuses the server: no AUTH sent."""
    import redis as redis_py

    from cloud.store.connect import redis_client

    refused = pytest.raises(redis_py.ConnectionError, match="certificate verify failed")
    with TLSRecorder(cas.right, redis) as rec, refused:
        redis_client(redis_settings(rec.port, cas.wrong.ca_file)).ping()
    assert rec.seen and all(seen.credentials == {} for seen in rec.seen)


def test_redis_gives_up_on_a_silent_server_after_the_socket_timeout(cas):
    """EDGELOOP_REDIS_SOCKET_TIMEOUT_S bounds each wait for an answer (redis-py retries a
    timed-out command three times; each attempt waits the timeout)."""
    import redis as redis_py

    from cloud.store.connect import redis_client

    with TLSRecorder(cas.right, redis_silent) as rec:
        s = redis_settings(rec.port, cas.right.ca_file, redis_socket_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(redis_py.TimeoutError):
            redis_client(s).ping()
        took = time.monotonic() - t0
    assert took < 0.5 * (len(rec.seen) + 1) * 4 + 3, (took, len(rec.seen))
    assert took < 10  # the default 30 s timeout would wait far longer


# --- S3 ----------------------------------------------------------------------------------


def s3_answer(method: str, path: str, headers: dict[str, str]):
    return 200, ({"ETag": '"0"'} if method == "PUT" else {}), b""


def s3_settings(port: int, ca_file, **more: object) -> CloudSettings:
    return settings(
        store="s3",
        s3_endpoint=f"localhost:{port}",
        s3_access_key="plant-a-ingest",
        s3_secret_key="s3-secret-from-a-vault",
        s3_secure=True,
        s3_ca_file=ca_file,
        s3_region="eu-plant-1",
        s3_bucket="edgeloop",
        **more,
    )


def test_s3_store_verifies_the_server_and_signs_with_its_key(cas):
    """open_store checks the S3 endpoint against EDGELOOP_S3_CA_FILE and signs each request
    with the access key for EDGELOOP_S3_REGION."""
    from cloud.store.objects import open_store

    with TLSRecorder(cas.right, http(s3_answer)) as rec:
        store = open_store(s3_settings(rec.port, cas.right.ca_file))
        store.put("samples/a", b"window")
    seen = rec.seen[0]
    assert seen.tls_version in TLS_VERSIONS and seen.sni == "localhost"
    assert seen.credentials == {"access_key": "plant-a-ingest", "region": "eu-plant-1"}
    methods = [r for s in rec.seen for r in s.requests]
    assert ("HEAD", "/edgeloop") in methods and ("PUT", "/edgeloop/samples/a") in methods


def test_s3_store_refuses_a_server_its_ca_did_not_sign(cas):
    """With the wrong EDGELOOP_S3_CA_FILE the store is unreachable, by name; no signed
    request leaves."""
    from cloud.store.objects import StorageError, open_store

    refused = pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED")
    with TLSRecorder(cas.right, http(s3_answer)) as rec, refused:
        open_store(s3_settings(rec.port, cas.wrong.ca_file))
    assert rec.seen and all(seen.credentials == {} for seen in rec.seen)


def test_s3_store_gives_up_on_a_slow_server_after_the_read_timeout(cas):
    """EDGELOOP_S3_READ_TIMEOUT_S bounds each wait for an answer (two retries)."""
    from cloud.store.objects import StorageError, open_store

    with TLSRecorder(cas.right, http(s3_answer, delay_s=4)) as rec:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="timed out"):
            open_store(s3_settings(rec.port, cas.right.ca_file, s3_read_timeout_s=0.5))
        took = time.monotonic() - t0
    assert took < 4, took  # three attempts of 0.5 s, not one of the server's 4 s


# --- MLflow ------------------------------------------------------------------------------


def mlflow_answer(method: str, path: str, headers: dict[str, str]):
    if path.startswith("/api/2.0/mlflow/experiments/get-by-name"):
        return 404, {}, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST"}).encode()
    if path == "/api/2.0/mlflow/experiments/create":
        return 200, {"Content-Type": "application/json"}, b'{"experiment_id": "7"}'
    return 404, {}, b"{}"


def mlflow_settings(port: int, ca_file, **more: object) -> CloudSettings:
    return settings(
        mlflow_tracking_uri=f"https://localhost:{port}",
        mlflow_ca_file=ca_file,
        mlflow_request_max_retries=0,
        **more,
    )


def test_mlflow_registry_verifies_the_server_and_sends_basic_auth(cas, clean_mlflow_env):
    """open_registry's client checks the tracking server against EDGELOOP_MLFLOW_CA_FILE and
    sends the configured user and password."""
    from cloud.tracking.registry import open_registry

    with TLSRecorder(cas.right, http(mlflow_answer)) as rec:
        s = mlflow_settings(
            rec.port,
            cas.right.ca_file,
            mlflow_tracking_username="edgeloop-worker",
            mlflow_tracking_password="mlflow-password-from-a-vault",
        )
        assert open_registry(s, "plant-a").experiment_id == "7"
    seen = rec.seen[0]
    assert seen.tls_version in TLS_VERSIONS and seen.sni == "localhost"
    assert seen.credentials == {
        "username": "edgeloop-worker",
        "password": "mlflow-password-from-a-vault",
    }
    assert ("POST", "/api/2.0/mlflow/experiments/create") in seen.requests


def test_mlflow_tracker_sends_a_bearer_token(cas, clean_mlflow_env):
    """With EDGELOOP_MLFLOW_TRACKING_TOKEN the rollout tracker sends it as a bearer token."""
    from cloud.tracking.rollouts import open_tracker

    with TLSRecorder(cas.right, http(mlflow_answer)) as rec:
        s = mlflow_settings(rec.port, cas.right.ca_file, mlflow_tracking_token="token-of-idp")
        assert open_tracker(s).experiment("plant-a") == "7"
    assert rec.seen[0].credentials == {"token": "token-of-idp"}


def test_mlflow_refuses_a_server_its_ca_did_not_sign(cas, clean_mlflow_env):
    """With the wrong EDGELOOP_MLFLOW_CA_FILE the client refuses the server: no password
    leaves the process."""
    from mlflow.exceptions import MlflowException

    from cloud.tracking.registry import open_registry

    with TLSRecorder(cas.right, http(mlflow_answer)) as rec:
        s = mlflow_settings(
            rec.port,
            cas.wrong.ca_file,
            mlflow_tracking_username="edgeloop-worker",
            mlflow_tracking_password="mlflow-password-from-a-vault",
        )
        with pytest.raises(MlflowException, match="CERTIFICATE_VERIFY_FAILED"):
            open_registry(s, "plant-a")
    assert rec.seen and all(seen.credentials == {} for seen in rec.seen)
