"""A live fleet for end-to-end rollout tests: registered packages, real agents fed with real
TEP windows, and the models a rollout must stop (one that fails its smoke check on the
device, one whose anomaly rate jumps)."""

from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np
import torch

from cloud.store.db import ModelVersion
from cloud.store.keys import package_key
from cloud.store.records import find_version
from cloud.store.windows import content_sha256
from shared.errors import EdgeloopError
from shared.package import ModelPackage, model_name


def package_variant(tiny_package, version: str, *, nan=False, rotate_classes=False) -> bytes:
    """The fixture's model packaged again as ``version`` (parent v1): as it is, with NaN
    weights (its smoke check fails on the device), or with its class names rotated (it
    calls normal windows faults: the canaries' anomaly rate jumps)."""
    from cloud.model.export import package_model

    pkg, model = tiny_package
    m = ModelPackage(pkg).manifest
    names = list(m.class_names)
    if nan:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    if rotate_classes:
        names = names[1:] + names[:1]
    return package_model(
        model,
        name=m.name,
        version=version,
        parent="v1",
        profile=m.profile,
        class_names=names,
        ood=m.metadata["ood"],
    )


def register_package(*, sessions, store, registry, fleet: str, package: bytes) -> str:
    """Store ``package``, log it as an MLflow run, register it as a model version (no alias)
    and record it as a round's register stage does; its MLflow version."""
    pkg = ModelPackage(package)
    m = pkg.manifest
    store.put(package_key(fleet, m.profile, m.version), package)
    n = len(m.class_names)
    run_id = registry.log_training_run(
        run_name=f"{fleet}-{m.profile}-{m.version}",
        params={"version": m.version},
        history=[1.0],
        metrics={"golden_macro_f1": 1.0},
        class_names=list(m.class_names),
        confusion=np.eye(n, dtype=int),
        lineage={"test": True},
        package=package,
    )
    mv = registry.register(
        fleet=fleet, run_id=run_id, package=package, gates={"passed": True}, promote=False
    ).mlflow_version
    with sessions() as s:
        if find_version(s, model_name(fleet, m.profile), m.version) is None:
            s.add(
                ModelVersion(
                    name=model_name(fleet, m.profile),
                    version=m.version,
                    mlflow_version=mv,
                    profile=m.profile,
                    sha256=pkg.sha256,
                    parent=m.parent,
                    object_key=package_key(fleet, m.profile, m.version),
                    class_names=list(m.class_names),
                    gates={"passed": True},
                    baselines={},
                )
            )
            s.commit()
    return mv


class Feeder:
    """Feeds each agent real windows (cycling through ``windows``; with ``noise``, each one
    made unique by Gaussian noise of that spread) on a thread, and ticks it (resends,
    heartbeats), until stopped: a plant that keeps running. ``sent`` maps the message id of
    each window an agent selected to its device and the window's content hash."""

    def __init__(
        self, agents, windows: np.ndarray, *, period_s: float = 0.02, noise: float = 0.0
    ) -> None:
        self.agents, self.windows, self.period_s = agents, windows, period_s
        self.noise, self.rng = noise, np.random.default_rng(16)
        self.sent: dict[str, tuple[str, str]] = {}
        self.stop_event = threading.Event()
        self.quiet_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Feeder:
        self.thread.start()
        return self

    def quiet(self) -> None:
        """No new windows from now on; the agents only tick (re-send until acked)."""
        self.quiet_event.set()

    def _run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            for agent in self.agents:
                # A model that fails on real windows is what some tests want: the agent
                # rolls it back and reports; the plant goes on.
                if agent.runtime is not None and not self.quiet_event.is_set():
                    w = self.windows[i % len(self.windows)]
                    if self.noise:
                        w = (w + self.rng.normal(0, self.noise, w.shape)).astype("f4")
                    with contextlib.suppress(EdgeloopError):
                        _, upload = agent.process(w)
                        if upload is not None:
                            self.sent[str(upload.message_id)] = (
                                agent.settings.device_id, content_sha256(w))  # fmt: skip
                agent.tick()
            i += 1
            self.stop_event.wait(self.period_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
