"""The recompress stage: the round's teacher → the exact package a device of the profile
runs (the compression pipeline for a profile of cloud/compress/profiles.toml; the teacher as
it is for ``cpu-fp32``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cloud.compress.distill import DistillConfig
from cloud.compress.pipeline import compress
from cloud.compress.profiles import load_profiles
from cloud.learn.close import choose, keep_student
from cloud.learn.data import golden_known, load_teacher, validation_set
from cloud.learn.state import RecompressOutput, RoundState, Services
from cloud.model.export import package_model
from cloud.model.ood import ood_calibration
from cloud.model.transformer import SensorTransformer
from cloud.store.datasets import LabelledWindows, load_dataset
from cloud.store.keys import package_key
from cloud.store.windows import load_keys
from shared.errors import ConfigError
from shared.package import ModelPackage, model_name


def stage_recompress(svc: Services, st: RoundState, say: Callable[[str], None]) -> RecompressOutput:
    trained = st.outputs["train"]
    teacher, class_names = load_teacher(svc.store, st.fleet, st.profile, st.version)
    base = load_dataset(store=svc.store, name=st.cfg.base_dataset)
    ood = ood_calibration(base.x[base.labels == class_names[0]])
    name = model_name(st.fleet, st.profile)
    profiles = load_profiles()
    summary = None
    if st.profile not in profiles:
        say(f"{st.profile}: the device runs the teacher as it is (no compression)")
        package = package_model(
            teacher,
            name=name,
            version=st.version,
            parent=trained["parent"],
            profile=st.profile,
            class_names=class_names,
            metadata={"new_classes": trained["new_classes"]},
            ood=ood,
        )
    else:
        if not isinstance(teacher, SensorTransformer):
            raise ConfigError(
                f"profile {st.profile!r} needs a compressible teacher (PatchTST or DeepSeek-V3 "
                "blocks to prune); this fleet's teacher is the CNN. Start the fleet with a "
                "transformer teacher, or give its devices the cpu-fp32 profile."
            )
        if trained.get("whole_base"):
            x, labels = base.x, base.labels
        else:
            pairs = [(f"sample:{i}", c) for i, c in trained["fit"]] + [
                (k, c) for k, c in trained["replay"]
            ]
            x = load_keys(
                sessions=svc.sessions, store=svc.store, base=base, keys=[k for k, _ in pairs]
            )
            labels = np.array([c for _, c in pairs])
        golden = golden_known(svc.store, st.cfg, class_names)
        val = validation_set(
            sessions=svc.sessions,
            store=svc.store,
            cfg=st.cfg,
            class_names=class_names,
            uploads=trained.get("validation", []),
        )
        result = compress(
            teacher,
            x=x,
            y=LabelledWindows(x, labels).indices(class_names),
            val_x=val.x,
            val_y=val.indices(class_names),
            golden_x=golden.x,
            golden_y=golden.indices(class_names),
            class_names=class_names,
            profile=profiles[st.profile],
            ood=ood,
            name=name,
            version=st.version,
            parent=trained["parent"],
            distill_cfg=DistillConfig(epochs=st.cfg.distill_epochs, seed=st.cfg.seed),
            latency_windows=100,
            progress=say,
        )
        package, student, close = choose(
            svc, st, unconstrained=result, teacher=teacher, x=x,
            y=LabelledWindows(x, labels).indices(class_names), val_x=val.x,
            val_y=val.indices(class_names), class_names=class_names,
            new_classes=list(trained.get("new_classes", [])), say=say,
        )  # fmt: skip
        keep_student(svc, st, student, class_names)
        summary = {**result.summary(), "delta_friendly": close}
        if close["strategy"] == "close":  # the other figures are the unconstrained one's
            summary.update(sha256=ModelPackage(package).sha256, edge_bytes=len(package))
    key = package_key(st.fleet, st.profile, st.version)
    svc.store.put(key, package)
    return {
        "package_key": key,
        "sha256": ModelPackage(package).sha256,
        "bytes": len(package),
        "compression": summary,
    }
