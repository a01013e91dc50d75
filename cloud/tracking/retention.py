"""MLflow's side of retention: a registered model's versions with their aliases and runs,
deleting a model version, and deleting a run (its artifacts first, then the run)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cloud.config import CloudSettings


@dataclass(frozen=True)
class RegistryVersion:
    name: str
    mlflow_version: str
    version: str  # the edgeloop version (tag ``edgeloop_version``), "" if untagged
    run_id: str | None
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    name: str
    started: datetime
    status: str  # RUNNING, FINISHED, FAILED, KILLED, SCHEDULED


def open_retention_tracker(settings: CloudSettings) -> RetentionTracker:
    return RetentionTracker(settings.resolved_mlflow_uri)


class RetentionTracker:
    """An MlflowClient on the settings' tracking server (no fluent API, no active run)."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)

    def fleet_models(self, fleet: str) -> list[str]:
        """The registered models of ``fleet`` (``edgeloop.{fleet}.{profile}``)."""
        prefix = f"edgeloop.{fleet}."
        found = self.client.search_registered_models(filter_string=f"name LIKE '{prefix}%'")
        return sorted(
            m.name for m in found if m.name.startswith(prefix) and "." not in m.name[len(prefix) :]
        )

    def versions(self, name: str) -> list[RegistryVersion]:
        """Every version of registered model ``name`` (none if it is not registered)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        return [
            RegistryVersion(
                name=name,
                mlflow_version=str(mv.version),
                version=(mv.tags or {}).get("edgeloop_version", ""),
                run_id=mv.run_id or None,
                aliases=tuple(sorted(by_version.get(str(mv.version), []))),
            )
            for mv in self.client.search_model_versions(filter_string=f"name = '{name}'")
        ]

    def delete_version(self, name: str, mlflow_version: str) -> bool:
        """Delete one model version; False if it was gone already."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_model_version(name, mlflow_version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def runs(self, fleet: str, *, started_before: datetime) -> list[TrackedRun]:
        """The live (not deleted) runs of ``fleet``'s experiment started before the time."""
        experiment = self.client.get_experiment_by_name(f"edgeloop-{fleet}")
        if experiment is None:
            return []
        ms = int(started_before.timestamp() * 1000)
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment.experiment_id],
                filter_string=f"attributes.start_time < {ms}",
                max_results=1000,
                page_token=token,
            )
            out += [
                TrackedRun(
                    run_id=r.info.run_id,
                    name=r.info.run_name or "",
                    started=datetime.fromtimestamp(r.info.start_time / 1000, UTC),
                    status=r.info.status,
                )
                for r in page
            ]
            token = page.token
            if not token:
                return out

    def run_bytes(self, run_id: str) -> int:
        """The bytes of a run's artifacts (walking its artifact tree)."""
        total = 0
        todo: list[str | None] = [None]
        while todo:
            for f in self.client.list_artifacts(run_id, todo.pop()):
                if f.is_dir:
                    todo.append(f.path)
                else:
                    total += f.file_size or 0
        return total

    def delete_run(self, run_id: str) -> None:
        """The run's artifacts, then the run (MLflow marks it deleted; ``mlflow gc`` on the
        server purges the row, the artifacts are gone already)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self.client.get_run(run_id)
        if run.info.lifecycle_stage == "deleted":
            return
        get_artifact_repository(run.info.artifact_uri).delete_artifacts()
        self.client.delete_run(run_id)
