"""A real MLflow server with authentication (its basic-auth app, configured by
deploy/mlflow/basic_auth.ini): our tracking client with an account's credentials logs a run
and registers a model version; without credentials, with a wrong password, or with an
account not granted the fleet, it gets a ConfigError that says what to set or grant."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from cloud.config import CloudSettings
from shared.errors import ConfigError
from shared.package import ModelPackage
from tests.conftest import ROOT, unique

ADMIN_PASSWORD = "admin-password-of-the-test"
WORKER, WORKER_PASSWORD = "edgeloop-worker", "worker-password-of-the-test"
VIEWER, VIEWER_PASSWORD = "viewer", "viewer-password-of-the-test"


def _spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_mlflow(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on a spare loopback port, with the deploy
    config (its user store moved into the test's folder) and two accounts besides the
    admin: the cloud's worker and a viewer granted nothing. Its URI."""
    home = tmp_path_factory.mktemp("mlflow-auth")
    config = configparser.ConfigParser()
    config.read(ROOT / "deploy" / "mlflow" / "basic_auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{home / 'basic_auth.db'}"
    with (home / "basic_auth.ini").open("w") as fh:
        config.write(fh)
    port = _spare_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(home / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-of-the-test",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            tail = (home / "server.log").read_text()[-3000:]
            pytest.fail(f"MLflow basic-auth server did not start: {tail}")
        time.sleep(0.3)
    admin = (config["mlflow"]["admin_username"], ADMIN_PASSWORD)
    for user, password in ((WORKER, WORKER_PASSWORD), (VIEWER, VIEWER_PASSWORD)):
        r = requests.post(
            f"{uri}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=admin,
        )
        assert r.status_code == 200, r.text
    yield uri
    server.terminate()
    server.wait(20)
    log.close()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def clean_mlflow_env():
    from cloud.tracking.connect import apply_mlflow_settings

    yield
    apply_mlflow_settings(CloudSettings(_env_file=None))


def account(uri: str, user: str | None, password: str | None) -> CloudSettings:
    return CloudSettings(
        _env_file=None,
        mlflow_tracking_uri=uri,
        mlflow_tracking_username=user,
        mlflow_tracking_password=password,
        mlflow_request_max_retries=0,
    )


def test_the_worker_account_logs_a_run_and_registers_a_version(
    auth_mlflow, tiny_package, clean_mlflow_env
):
    """With the worker's credentials the registry logs a run (params, metrics, plots, the
    package as an artifact through the server) and registers it as champion."""
    from cloud.tracking.registry import open_registry

    pkg, _ = tiny_package
    m = ModelPackage(pkg).manifest
    fleet = unique("f")
    registry = open_registry(account(auth_mlflow, WORKER, WORKER_PASSWORD), fleet)
    n = len(m.class_names)
    run_id = registry.log_training_run(
        run_name="auth", params={"v": 1}, history=[0.5], metrics={"golden_macro_f1": 0.9},
        class_names=list(m.class_names), confusion=np.eye(n, dtype=int), lineage={},
        package=pkg,
    )  # fmt: skip
    version = registry.register(
        fleet=fleet, run_id=run_id, package=pkg, gates={"passed": True}, promote=True
    )
    champion, tags = registry.champion(fleet, m.profile) or (None, {})
    assert champion == version.mlflow_version and tags["sha256"] == version.sha256
    assert registry.download_package(run_id) == pkg


@pytest.mark.parametrize(
    ("user", "password"), [(None, None), (WORKER, "not-the-password")], ids=["none", "wrong"]
)
def test_missing_or_wrong_credentials_are_a_config_error(
    auth_mlflow, user, password, clean_mlflow_env
):
    """No credentials, or a wrong password: a ConfigError naming the settings, no traceback
    of MLflow's."""
    from cloud.tracking.registry import open_registry

    with pytest.raises(ConfigError, match=r"refused our credentials \(401 Unauthorized\)") as e:
        open_registry(account(auth_mlflow, user, password), unique("f"))
    assert "EDGELOOP_MLFLOW_TRACKING_USERNAME" in str(e.value)
    assert password is None or password not in str(e.value)


def test_an_account_not_granted_the_fleet_is_told_what_to_grant(auth_mlflow, clean_mlflow_env):
    """The viewer (granted nothing) opening the worker's fleet: a ConfigError that says
    which account was denied and what to grant."""
    from cloud.tracking.registry import open_registry

    fleet = unique("f")
    open_registry(account(auth_mlflow, WORKER, WORKER_PASSWORD), fleet)
    with pytest.raises(ConfigError, match=r"denied the account viewer .*403.*grant it EDIT"):
        open_registry(account(auth_mlflow, VIEWER, VIEWER_PASSWORD), fleet)
