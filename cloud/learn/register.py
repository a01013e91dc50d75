"""The register stage: the MLflow run (params, loss per epoch, metrics, plots, lineage,
package) and a model version with its tags, ``champion`` only if the gates passed; then
the row the triggers and the rollout read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from cloud.learn.state import RegisterOutput, RoundState, Services
from cloud.learn.triggers import fleet_anomaly_rate
from cloud.store.db import ModelVersion
from cloud.store.records import find_version
from shared.package import model_name


def stage_register(svc: Services, st: RoundState, say: Callable[[str], None]) -> RegisterOutput:
    """MLflow run and model version, then the row the triggers and the publisher read. A
    round that died after registering finds its version in MLflow and only records it."""
    out = st.outputs
    trained, packaged, evaluated = out["train"], out["recompress"], out["evaluate"]
    gates = evaluated["gates"]
    name = model_name(st.fleet, st.profile)
    found = svc.registry.find_version(st.fleet, st.profile, st.version)
    if found is not None:
        mlflow_version, tags = found
        if tags.get("sha256") != packaged["sha256"]:
            raise RuntimeError(
                f"MLflow already holds {name} {st.version} "
                f"(version {mlflow_version}) with another package (sha256 "
                f"{tags.get('sha256', '?')[:12]}…, this round's is {packaged['sha256'][:12]}…); "
                "delete that model version in MLflow, then resume this round"
            )
        # The aliases may not have been set before the crash: set them now.
        svc.registry.set_aliases(name, mlflow_version, champion=bool(gates["passed"]))
        say(f"{st.version} was registered before this attempt (MLflow version {mlflow_version})")
    else:
        package = svc.store.get(packaged["package_key"])
        metrics = dict(evaluated["metrics"])
        for k, v in (packaged["compression"] or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                metrics[f"compression_{k}"] = v  # teacher → edge: sizes, speed-up, F1
        run_id = svc.registry.log_training_run(
            run_name=f"{st.fleet}-{st.profile}-{st.version}",
            params={
                "parent": trained["parent"],
                "classes": trained["class_names"],
                "new_classes": trained["new_classes"],
                "samples": trained["samples_used"],
                "profile": st.profile,
                "replay_per_class": st.cfg.replay_per_class,
                "pseudo_label_min_confidence": st.cfg.pseudo_label_min_confidence,
                **asdict(st.cfg.train),
            },
            history=trained["history"],
            val_history=trained.get("val_f1", []),
            metrics=metrics,
            class_names=evaluated["class_names"],
            confusion=np.array(evaluated["confusion"]),
            lineage={**trained["lineage"], "compression": packaged["compression"]},
            package=package,
        )
        mlflow_version = svc.registry.register(
            fleet=st.fleet, run_id=run_id, package=package, gates=gates, promote=gates["passed"]
        ).mlflow_version
    with svc.sessions() as session:
        if find_version(session, name, st.version) is None:
            session.add(
                ModelVersion(
                    name=name,
                    version=st.version,
                    mlflow_version=mlflow_version,
                    profile=st.profile,
                    sha256=packaged["sha256"],
                    parent=trained["parent"],
                    object_key=packaged["package_key"],
                    class_names=trained["class_names"],
                    gates=gates,
                    baselines={
                        "fleet_anomaly_rate": fleet_anomaly_rate(session, st.fleet, st.profile),
                        "label_watermark": trained["label_watermark"],
                    },
                )
            )
            session.commit()
    return {"mlflow_version": mlflow_version, "promoted": bool(gates["passed"])}
