"""One round of the loop's learning half: gather labels, replay, fine-tune, gate, register."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from cloud.datasets import LabelledWindows, load_dataset
from cloud.db import Label, ModelVersion, Sample
from cloud.ingest import load_window
from cloud.metrics import Evaluation, classification_metrics
from cloud.registry import Registry, model_name
from cloud.storage import ObjectStore
from cloud.training import (
    ModelConfig,
    TrainConfig,
    WindowClassifier,
    build_model,
    extend_classes,
    ood_calibration,
    package_model,
    predict,
    train,
)
from cloud.triggers import fleet_anomaly_rate
from shared.errors import DataError

log = logging.getLogger(__name__)
NORMAL = "normal"  # class index 0 of every model: what the plant does when nothing is wrong


def evaluate(
    model: WindowClassifier, x: np.ndarray, y: np.ndarray, class_names: list[str]
) -> Evaluation:
    return classification_metrics(y, predict(model, x), class_names)


def detection_rate(
    model: WindowClassifier, x_faults: np.ndarray, normal: str, class_names: list[str]
) -> float:
    """Share of fault windows the model does not call ``normal``."""
    if len(x_faults) == 0:
        return float("nan")
    return float((predict(model, x_faults) != class_names.index(normal)).mean())


# -- checkpoints: what is needed to rebuild the teacher, never pickle -------------------------


def checkpoint_key(fleet: str, version: str) -> str:
    return f"checkpoints/{fleet}/{version}.safetensors"


def save_checkpoint(
    store: ObjectStore, key: str, model: WindowClassifier, class_names: list[str]
) -> None:
    meta = {"model_config": json.dumps(asdict(model.cfg)), "class_names": json.dumps(class_names)}
    store.put(key, save_safetensors(model.state_dict(), metadata=meta))


def load_checkpoint(store: ObjectStore, key: str) -> tuple[WindowClassifier, list[str]]:
    data = store.get(key)
    # safetensors holds tensors only: nothing in a checkpoint can run code on load.
    state = load_safetensors(data)
    meta = _safetensors_metadata(data)
    model = WindowClassifier(ModelConfig(**json.loads(meta["model_config"])))
    model.load_state_dict(state)
    model.eval()
    return model, json.loads(meta["class_names"])


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


# -- a round ---------------------------------------------------------------------------------


@dataclass
class RoundConfig:
    fleet: str
    profile: str = "cpu-fp32"
    base_dataset: str = "base"  # the registered history that replay draws from
    golden_dataset: str = "golden"
    replay_per_class: int = 120
    holdout_fraction: float = 0.25  # of new labelled samples, kept out of training for gates
    max_old_f1_drop_pts: float = 3.0
    # Share of the golden set's fault windows (of any fault, known or not) that the model
    # flags as not normal: a missed alarm is the costliest error in a plant.
    max_detection_drop_pts: float = 3.0
    min_new_recall: float = 0.5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=25, lr=2e-3))
    seed: int = 0


@dataclass
class RoundResult:
    version: str
    parent: str | None
    class_names: list[str]
    new_classes: list[str]
    samples_used: int
    gates: dict[str, Any]
    promoted: bool
    package: bytes
    mlflow_version: str
    seconds: float


def labelled_uploads(
    *, sessions: sessionmaker, store: ObjectStore, fleet: str
) -> tuple[LabelledWindows, list[str]]:
    """Every uploaded window of ``fleet`` with a label; a device's or operator's label wins
    over a teacher's pseudo-label. Returns the windows and their content hashes."""
    rank = {"operator": 0, "device": 1, "teacher": 2}
    with sessions() as session:
        rows = session.execute(
            select(
                Sample.id,
                Sample.object_key,
                Sample.object_index,
                Sample.content_sha256,
                Label.label,
                Label.source,
            )
            .join(Label, Label.sample_id == Sample.id)
            .where(Sample.fleet == fleet)
        ).all()
    best: dict[str, tuple] = {}
    for r in rows:
        if r.id not in best or rank[r.source] < rank[best[r.id].source]:
            best[r.id] = r
    chosen = sorted(best.values(), key=lambda r: r.id)
    if not chosen:
        return LabelledWindows(np.empty((0, 1, 1), np.float32), np.array([], dtype=str)), []
    objects = {key: load_window(store, key) for key in {r.object_key for r in chosen}}
    x = np.stack(
        [
            objects[r.object_key]
            if r.object_index is None
            else objects[r.object_key][r.object_index]
            for r in chosen
        ]
    ).astype(np.float32)
    return (
        LabelledWindows(x, np.array([r.label for r in chosen])),
        [r.content_sha256 for r in chosen],
    )


def _replay(base: LabelledWindows, per_class: int, rng: np.random.Generator) -> LabelledWindows:
    """A class-balanced draw from history: up to ``per_class`` windows of each class,
    uniformly without replacement."""
    keep = []
    for c in np.unique(base.labels):
        idx = np.flatnonzero(base.labels == c)
        keep.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    keep = np.sort(np.array(keep))
    return LabelledWindows(base.x[keep], base.labels[keep])


def next_version(*, sessions: sessionmaker, fleet: str, profile: str) -> str:
    with sessions() as session:
        n = (
            session.scalar(
                select(func.count())
                .select_from(ModelVersion)
                .where(ModelVersion.name == model_name(fleet, profile))
            )
            or 0
        )
    return f"v{n + 1}"


def train_initial(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    cfg: RoundConfig,
    model_config: ModelConfig | None = None,
) -> RoundResult:
    """Round 0: a model for the base data set's classes, registered as champion."""
    t0 = time.perf_counter()
    base = load_dataset(store=store, name=cfg.base_dataset)
    if NORMAL not in set(base.labels.tolist()):
        raise DataError(
            f"data set {cfg.base_dataset!r} has no {NORMAL!r} windows; the model "
            "and its out-of-distribution score are calibrated on normal operation"
        )
    class_names = sorted(set(base.labels.tolist()), key=lambda c: (c != NORMAL, c))
    y = base.indices(class_names)
    mc = model_config or ModelConfig(
        window=base.x.shape[1], channels=base.x.shape[2], n_classes=len(class_names)
    )
    model = build_model(mc, base.x[y == 0])
    history: list[float] = []
    train(model, base.x, y, TrainConfig(seed=cfg.seed), on_epoch=lambda _, v: history.append(v))
    return _finish(
        sessions=sessions,
        store=store,
        registry=registry,
        cfg=cfg,
        model=model,
        class_names=class_names,
        parent=None,
        new_classes=class_names,
        history=history,
        holdout=None,
        lineage={"base": base.sha256()},
        base=base,
        samples_used=len(base),
        t0=t0,
        parent_model=None,
    )


def run_round(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    cfg: RoundConfig,
    version: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> RoundResult:
    """Fine-tune the current teacher on new labelled uploads plus replay, gate, register.

    ``version``: reserved by the caller (a Celery round); default: the next free one.
    ``on_stage("registering")`` is called before anything is written or registered."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    with sessions() as session:
        # The parent is the newest model that passed its gates (the champion), never a
        # challenger that failed them.
        rows = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == model_name(cfg.fleet, cfg.profile))
            .order_by(ModelVersion.id.desc())
        ).all()
        parent_row = next((r for r in rows if (r.gates or {}).get("passed")), None)
        if parent_row is None:
            raise DataError(
                f"fleet {cfg.fleet} has no promoted model yet; train the initial one first"
            )
        parent_version = parent_row.version
    parent_model, old_classes = load_checkpoint(store, checkpoint_key(cfg.fleet, parent_version))
    with sessions() as session:
        # Labels up to this id are what this round learns from; the triggers count what
        # arrives after it (also while the round trains) as new.
        watermark = session.scalar(select(func.max(Label.id))) or 0
    uploads, hashes = labelled_uploads(sessions=sessions, store=store, fleet=cfg.fleet)
    if len(uploads) == 0:
        raise DataError(f"fleet {cfg.fleet} has no labelled uploads to learn from")
    new_classes = sorted(set(uploads.labels.tolist()) - set(old_classes))
    class_names = old_classes + new_classes
    # Hold a slice of the uploads out of training: the gate's evidence on new faults. The
    # split goes by content hash, so a window stays on the same side in every round and a
    # parent never saw the windows its successor is judged on.
    held = np.array([int(h[:8], 16) / 2**32 < cfg.holdout_fraction for h in hashes], dtype=bool)
    hold, fit = np.flatnonzero(held), np.flatnonzero(~held)
    base = load_dataset(store=store, name=cfg.base_dataset)
    replay = _replay(base, cfg.replay_per_class, rng)
    x = np.concatenate([uploads.x[fit], replay.x])
    labels = np.concatenate([uploads.labels[fit], replay.labels])
    y = LabelledWindows(x, labels).indices(class_names)
    model = extend_classes(copy.deepcopy(parent_model), len(class_names))
    history: list[float] = []
    train(model, x, y, cfg.train, on_epoch=lambda _, v: history.append(v))
    holdout = LabelledWindows(uploads.x[hold], uploads.labels[hold])
    lineage = {
        "label_watermark": watermark,
        "parent": parent_version,
        "base": base.sha256(),
        "uploads": sorted(set(hashes)),
        "replay_windows": len(replay),
        "holdout_windows": len(holdout),
    }
    return _finish(
        sessions=sessions,
        store=store,
        registry=registry,
        cfg=cfg,
        model=model,
        class_names=class_names,
        parent=parent_version,
        new_classes=new_classes,
        history=history,
        holdout=holdout,
        lineage=lineage,
        base=base,
        samples_used=len(x),
        t0=t0,
        parent_model=(parent_model, old_classes),
        version=version,
        on_stage=on_stage,
    )


def _finish(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    cfg: RoundConfig,
    model: WindowClassifier,
    class_names: list[str],
    parent: str | None,
    new_classes: list[str],
    history: list[float],
    holdout: LabelledWindows | None,
    lineage: dict[str, Any],
    base: LabelledWindows,
    samples_used: int,
    t0: float,
    parent_model: tuple[WindowClassifier, list[str]] | None,
    version: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> RoundResult:
    golden = load_dataset(store=store, name=cfg.golden_dataset)
    known = np.isin(golden.labels, class_names)
    gx = golden.x[known]
    gy = LabelledWindows(gx, golden.labels[known]).indices(class_names)
    ev = evaluate(model, gx, gy, class_names)
    metrics = ev.metrics("golden")
    faults = golden.labels != class_names[0]
    detection = detection_rate(model, golden.x[faults], class_names[0], class_names)
    metrics["golden_detection_rate"] = detection
    gates: dict[str, Any] = {"golden_macro_f1": ev.macro_f1, "detection_rate": detection}
    passed = True
    if parent_model is not None:
        pm, pclasses = parent_model
        det_before = detection_rate(pm, golden.x[faults], pclasses[0], pclasses)
        det_drop = 100 * (det_before - detection)
        gates.update(
            detection_rate_before=det_before,
            detection_drop_pts=det_drop,
            max_detection_drop_pts=cfg.max_detection_drop_pts,
        )
        passed &= det_drop <= cfg.max_detection_drop_pts
        old = np.isin(golden.labels, pclasses)
        old_y = LabelledWindows(golden.x[old], golden.labels[old]).indices(pclasses)
        before = evaluate(pm, golden.x[old], old_y, pclasses).macro_f1
        after = evaluate(
            model,
            golden.x[old],
            LabelledWindows(golden.x[old], golden.labels[old]).indices(class_names),
            class_names,
        ).macro_f1
        drop = 100 * (before - after)
        gates.update(
            old_f1_before=before,
            old_f1_after=after,
            old_f1_drop_pts=drop,
            max_old_f1_drop_pts=cfg.max_old_f1_drop_pts,
        )
        passed &= drop <= cfg.max_old_f1_drop_pts
        metrics["old_f1_drop_pts"] = drop
    if holdout is not None and len(holdout):
        hy = holdout.indices(class_names)
        hev = evaluate(model, holdout.x, hy, class_names)
        new_recall = {c: hev.recall[c] for c in new_classes if c in hev.recall}
        gates["holdout_new_recall"] = new_recall
        gates["min_new_recall"] = cfg.min_new_recall
        passed &= all(v >= cfg.min_new_recall for v in new_recall.values())
        metrics.update({f"holdout_recall_{k}": v for k, v in new_recall.items()})
    gates["passed"] = bool(passed)

    normal_windows = base.x[base.labels == class_names[0]]
    version = version or next_version(sessions=sessions, fleet=cfg.fleet, profile=cfg.profile)
    if on_stage is not None:
        on_stage("registering")
    package = package_model(
        model,
        name=model_name(cfg.fleet, cfg.profile),
        version=version,
        parent=parent,
        profile=cfg.profile,
        class_names=class_names,
        metadata={"new_classes": new_classes},
        ood=ood_calibration(normal_windows),
    )
    save_checkpoint(store, checkpoint_key(cfg.fleet, version), model, class_names)
    pkg_key = f"packages/{cfg.fleet}/{cfg.profile}/{version}.edgepkg"
    store.put(pkg_key, package)
    run_id = registry.log_training_run(
        run_name=f"{cfg.fleet}-{cfg.profile}-{version}",
        params={
            "parent": parent,
            "classes": class_names,
            "new_classes": new_classes,
            "samples": samples_used,
            **asdict(cfg.train),
        },
        history=history,
        metrics=metrics,
        class_names=class_names,
        confusion=ev.confusion,
        lineage=lineage,
        package=package,
    )
    reg = registry.register(
        fleet=cfg.fleet, run_id=run_id, package=package, gates=gates, promote=passed
    )
    with sessions() as session:
        session.add(
            ModelVersion(
                name=reg.name,
                version=version,
                mlflow_version=reg.mlflow_version,
                profile=cfg.profile,
                sha256=reg.sha256,
                parent=parent,
                object_key=pkg_key,
                class_names=class_names,
                # Not gates: the fleet's anomaly rate now and the last label learnt from, the
                # triggers' baselines.
                gates={
                    **gates,
                    "fleet_anomaly_rate": fleet_anomaly_rate(session, cfg.fleet, cfg.profile),
                    "label_watermark": lineage.get("label_watermark"),
                },
            )
        )
        session.commit()
    return RoundResult(
        version=version,
        parent=parent,
        class_names=class_names,
        new_classes=new_classes,
        samples_used=samples_used,
        gates=gates,
        promoted=passed,
        package=package,
        mlflow_version=reg.mlflow_version,
        seconds=time.perf_counter() - t0,
    )
