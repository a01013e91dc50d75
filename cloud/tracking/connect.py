"""How our MLflow clients reach the tracking server: credentials, the server's CA and a
request timeout from the settings (EDGELOOP_MLFLOW_*), and a clear error when the server
refuses them.

MLflow's REST client reads these from its own environment variables at every request
(mlflow.utils.rest_utils, ``get_default_host_creds``), process-wide: so every MlflowClient
of ours is made by ``mlflow_client``, which sets them first."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from cloud.config import CloudSettings, get_settings
from shared.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

# setting → the MLflow environment variable that carries it
MLFLOW_ENV = {
    "mlflow_tracking_username": "MLFLOW_TRACKING_USERNAME",
    "mlflow_tracking_password": "MLFLOW_TRACKING_PASSWORD",
    "mlflow_tracking_token": "MLFLOW_TRACKING_TOKEN",
    "mlflow_ca_file": "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "mlflow_request_timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "mlflow_request_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
}
_lock = threading.Lock()
_ours: set[str] = set()  # the variables this process set from settings (and may unset)


def apply_mlflow_settings(settings: CloudSettings) -> None:
    """Put the settings' MLflow credentials, CA and timeout where MLflow reads them. A
    setting left unset removes only a variable that we set before (one set by hand in the
    environment stays)."""
    with _lock:
        for field, var in MLFLOW_ENV.items():
            value = getattr(settings, field)
            if value is not None:
                os.environ[var] = str(value)
                _ours.add(var)
            elif var in _ours:
                os.environ.pop(var, None)
                _ours.discard(var)


def mlflow_client(tracking_uri: str, settings: CloudSettings | None = None) -> MlflowClient:
    """An MlflowClient on ``tracking_uri`` with the settings' credentials, CA and timeout
    (default: this process's settings)."""
    from mlflow import MlflowClient

    apply_mlflow_settings(settings or get_settings())
    return MlflowClient(tracking_uri=tracking_uri)


def refused(exc: Exception, tracking_uri: str) -> ConfigError | None:
    """A ConfigError that says what to set, if ``exc`` is the server refusing our
    credentials (401) or their rights (403); None for any other error."""
    status = _status(exc)
    where = tracking_uri.split("@")[-1]
    if status == 401:
        return ConfigError(
            f"the MLflow server {where} refused our credentials (401 Unauthorized): set "
            "EDGELOOP_MLFLOW_TRACKING_USERNAME and EDGELOOP_MLFLOW_TRACKING_PASSWORD (or "
            "EDGELOOP_MLFLOW_TRACKING_TOKEN) to an account of its basic-auth app"
        )
    if status == 403:
        return ConfigError(
            f"the MLflow server {where} denied the account "
            f"{os.environ.get('MLFLOW_TRACKING_USERNAME', '(token)')} this request (403 "
            "Permission Denied): grant it EDIT (or MANAGE) on the experiment and registered "
            "models, or use an admin account"
        )
    return None


def _status(exc: Exception) -> int | None:
    """The HTTP status of an MLflow client error (MlflowException maps it from the answer)."""
    code: Any = getattr(exc, "get_http_status_code", lambda: None)()
    return code if isinstance(code, int) else None
