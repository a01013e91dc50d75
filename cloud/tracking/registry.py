"""MLflow: runs, metrics, plots, lineage and the registry of edge packages."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import CloudSettings
from cloud.tracking.connect import mlflow_client, refused
from cloud.tracking.plots import confusion_figure, recall_figure
from shared.package import ModelPackage, model_name

log = logging.getLogger(__name__)


# Who last moved ``champion`` to a version with our commands, and when (Unix seconds).
MOVED_BY_TAG = "edgeloop.moved_by"
MOVED_AT_TAG = "edgeloop.moved_at"
ROUND_MOVER = "a learning round (its gates passed)"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    mlflow_version: str
    run_id: str
    sha256: str


def open_registry(settings: CloudSettings, fleet: str) -> Registry:
    """The registry of ``fleet`` on the settings' tracking server: one experiment a fleet."""
    return Registry(
        settings.resolved_mlflow_uri,
        experiment=f"edgeloop-{fleet}",
        artifact_location=settings.mlflow_artifact_location,
        settings=settings,
    )


class Registry:
    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        artifact_location: str | None = None,
        settings: CloudSettings | None = None,
    ) -> None:
        """``artifact_location``: where a new experiment keeps its artifacts; needed with a
        file or sqlite store, which otherwise writes to ./mlruns of the current directory.
        ``settings``: credentials, CA and timeout (default: this process's). A server that
        refuses them is a ConfigError that says what to set."""
        import mlflow
        from mlflow.exceptions import MlflowException

        self.mlflow = mlflow
        self.client = mlflow_client(tracking_uri, settings)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
        except MlflowException as exc:
            raise (refused(exc, tracking_uri) or exc) from exc

    def log_training_run(
        self,
        *,
        run_name: str,
        params: dict[str, Any],
        history: list[float],
        metrics: dict[str, float],
        class_names: list[str],
        confusion: np.ndarray,
        lineage: dict[str, Any],
        package: bytes,
        val_history: list[float] = (),  # type: ignore[assignment]
    ) -> str:
        """One run: params, loss and validation macro-F1 per epoch, final metrics, plots,
        lineage, the package."""
        with self.mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name) as run:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            for epoch, loss in enumerate(history):
                self.mlflow.log_metric("train_loss", loss, step=epoch)
            for epoch, f1 in enumerate(val_history):
                self.mlflow.log_metric("val_macro_f1", f1, step=epoch)
            self.mlflow.log_metrics(metrics)
            self.mlflow.log_dict(lineage, "lineage.json")
            self.mlflow.log_figure(confusion_figure(confusion, class_names), "confusion.png")
            self.mlflow.log_figure(recall_figure(confusion, class_names), "recall.png")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.edgepkg"
                path.write_bytes(package)
                self.mlflow.log_artifact(str(path), artifact_path="edge_package")
            return run.info.run_id

    def register(
        self, *, fleet: str, run_id: str, package: bytes, gates: dict[str, Any], promote: bool
    ) -> RegisteredVersion:
        """A model version per profile, tagged with what a device and an operator need."""
        pkg = ModelPackage(package)
        m = pkg.manifest
        name = model_name(fleet, m.profile)
        if self.client.search_registered_models(filter_string=f"name = '{name}'") == []:
            self.client.create_registered_model(
                name, description=f"Edge packages for fleet {fleet}, profile {m.profile}"
            )
        tags = {
            "sha256": pkg.sha256,
            "edgeloop_version": m.version,
            "parent": m.parent or "",
            "profile": m.profile,
            "classes": json.dumps(list(m.class_names)),
            "gate_verdict": "pass" if gates.get("passed") else "fail",
            "gates": json.dumps(gates)[:5000],
        }
        mv = self.client.create_model_version(
            name, source=f"runs:/{run_id}/edge_package", run_id=run_id, tags=tags
        )
        self.set_aliases(name, str(mv.version), champion=promote)
        log.info(
            "registered %s version %s (%s)%s",
            name,
            mv.version,
            m.version,
            " as champion" if promote else "",
        )
        return RegisteredVersion(name, str(mv.version), run_id, pkg.sha256)

    def set_aliases(self, name: str, mlflow_version: str, *, champion: bool) -> None:
        """``challenger`` always; ``champion`` too if it passed its gates."""
        self.client.set_registered_model_alias(name, "challenger", mlflow_version)
        if champion:
            self.promote(name, mlflow_version, by=ROUND_MOVER)

    def promote(self, name: str, mlflow_version: str, *, by: str) -> None:
        """Move ``champion`` to ``mlflow_version``, recording ``by`` and the time on the
        version first (MLflow's alias event names no user; the rollout it starts reads
        these tags, and the webhook may be handled before this returns)."""
        self.client.set_model_version_tag(name, mlflow_version, MOVED_BY_TAG, by[:200])
        self.client.set_model_version_tag(name, mlflow_version, MOVED_AT_TAG, f"{time.time():.3f}")
        self.client.set_registered_model_alias(name, "champion", mlflow_version)

    def find_version(
        self, fleet: str, profile: str, version: str
    ) -> tuple[str, dict[str, str]] | None:
        """``(mlflow version, tags)`` of the registered package with edgeloop ``version``."""
        name = model_name(fleet, profile)
        if self.client.search_registered_models(filter_string=f"name = '{name}'") == []:
            return None
        for mv in self.client.search_model_versions(filter_string=f"name = '{name}'"):
            if mv.tags.get("edgeloop_version") == version:
                return str(mv.version), dict(mv.tags)
        return None

    def champion(self, fleet: str, profile: str) -> tuple[str, dict[str, str]] | None:
        """``(mlflow version, tags)`` of the champion, or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(model_name(fleet, profile), "champion")
        except MlflowException:
            return None
        return str(mv.version), dict(mv.tags)

    def download_package(self, run_id: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = self.mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="edge_package/model.edgepkg", dst_path=tmp
            )
            return Path(path).read_bytes()
