"""MLflow's side of rollouts: each rollout a run in its fleet's experiment (params, step
metrics, fleet-status tables), its model version tagged with it; and the champions the
reconcile compares with rollout records."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

from cloud.config import CloudSettings
from cloud.tracking.connect import mlflow_client
from cloud.tracking.registry import MOVED_AT_TAG, MOVED_BY_TAG
from shared.package import model_name

log = logging.getLogger(__name__)

# How a run ends by the rollout's final state.
RUN_STATUS = {"done": "FINISHED", "aborted": "FAILED", "superseded": "KILLED"}
TABLE = "fleet_status.json"  # one snapshot appended per wave and at the end (column: step)


def open_tracker(settings: CloudSettings) -> RolloutTracker:
    return RolloutTracker(
        settings.resolved_mlflow_uri,
        artifact_location=settings.mlflow_artifact_location,
        settings=settings,
    )


class RolloutTracker:
    """An MlflowClient (no fluent API: no process-wide active run, so a worker's threads
    may track rollouts side by side)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        artifact_location: str | None = None,
        settings: CloudSettings | None = None,
    ) -> None:
        self.client = mlflow_client(tracking_uri, settings)
        self.artifact_location = artifact_location
        self._experiments: dict[str, str] = {}

    def experiment(self, fleet: str) -> str:
        """The id of ``edgeloop-{fleet}``, created if missing (the fleet's rounds share it)."""
        if fleet not in self._experiments:
            name = f"edgeloop-{fleet}"
            found = self.client.get_experiment_by_name(name)
            self._experiments[fleet] = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(name, artifact_location=self.artifact_location)
            )
        return self._experiments[fleet]

    def open_run(
        self, *, fleet: str, rollout_id: int, run_name: str, params: dict[str, Any]
    ) -> str:
        """The rollout's run: found by its ``rollout_id`` tag (a worker killed after creating
        it and before recording its id makes no second run), else created with ``params``."""
        experiment = self.experiment(fleet)
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.rollout_id = '{rollout_id}'", max_results=1
        )
        if found:
            return str(found[0].info.run_id)
        run = self.client.create_run(
            experiment,
            run_name=run_name,
            tags={"rollout_id": str(rollout_id), "edgeloop_kind": "rollout", "fleet": fleet},
        )
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, str(value)[:500])
        return str(run.info.run_id)

    def log_step(self, *, run_id: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_table(
        self, *, run_id: str, columns: dict[str, list[Any]], step: int, artifact_file: str = TABLE
    ) -> None:
        """One snapshot of a table, by default the fleet's status (appended to the run's)."""
        n = len(next(iter(columns.values()), []))
        if n:
            with warnings.catch_warnings():
                # MLflow 3.x's own select_dtypes call warns under pandas 3 (not ours to fix).
                warnings.filterwarnings("ignore", message=".*select_dtypes.*")
                data = {"step": [step] * n, **columns}
                self.client.log_table(run_id, data=data, artifact_file=artifact_file)

    def tag_version(
        self,
        *,
        name: str,
        mlflow_version: str,
        rollout_id: int,
        state: str,
        deltas: Sequence[Any] = (),
    ) -> None:
        """The version's rollout and state; and its lineage (``cloud.rollout.deltas.Lineage``
        rows): on it, the deltas made to it (base version: bytes, "-" when not smaller
        than the package); on each base version, the delta made from it to this one."""
        self.client.set_model_version_tag(name, mlflow_version, "rollout_id", str(rollout_id))
        self.client.set_model_version_tag(name, mlflow_version, "rollout_state", state)
        size = {d.base_version: "-" if d.length is None else str(d.length) for d in deltas}
        if size:
            text = ", ".join(f"{b}: {n}" for b, n in size.items())
            self.client.set_model_version_tag(name, mlflow_version, "deltas_from", text[:5000])
        for d in deltas:
            if d.base_mlflow_version is not None:
                devices = ", ".join(d.devices) or "none yet"
                text = f"{size[d.base_version]} bytes of {d.target_length}; applied by {devices}"
                key = f"delta_to_{d.target_version}"
                self.client.set_model_version_tag(name, d.base_mlflow_version, key, text[:5000])

    def finish(self, *, run_id: str, state: str, reason: str = "") -> None:
        if reason:
            self.client.set_tag(run_id, "rollout_reason", reason[:5000])
        self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FINISHED"))

    def mover(self, fleet: str, profile: str, mlflow_version: str) -> tuple[str, float] | None:
        """(who, when) the version's ``edgeloop.moved_by`` / ``_at`` tags name: the last
        move of ``champion`` to it by our commands; None if it has none."""
        tags = self.client.get_model_version(model_name(fleet, profile), str(mlflow_version)).tags
        tags = tags or {}
        try:
            return tags[MOVED_BY_TAG], float(tags[MOVED_AT_TAG])
        except (KeyError, ValueError):
            return None

    def champions(self) -> dict[tuple[str, str], str]:
        """(fleet, profile) → the MLflow version its ``champion`` alias names, for every
        registered model named ``edgeloop.{fleet}.{profile}``."""
        out: dict[tuple[str, str], str] = {}
        token = None
        while True:
            page = self.client.search_registered_models(
                filter_string="name LIKE 'edgeloop.%'", max_results=100, page_token=token
            )
            for model in page:
                version = (model.aliases or {}).get("champion")
                rest, _, profile = model.name.removeprefix("edgeloop.").rpartition(".")
                if version is not None and rest:
                    out[(rest, profile)] = str(version)
            token = page.token
            if not token:
                return out
