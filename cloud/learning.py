"""A learning round, stage by stage: train → recompress → evaluate → register.

Each stage is a plain function of the round's row (cloud.rounds keeps its settings and every
stage's output in the ``rounds`` table): it re-reads what it needs from the database and
the object store and returns a JSON-able output. Celery runs the stages as a chain of tasks
(cloud.tasks), one per stage, so a round can be looked at stage by stage and resumed from
the first stage not done; ``run_round`` runs the same stages in this process (the demo).

- **train**: fine-tune the fleet's current teacher on the labels that arrived since its
  round plus a class-balanced reservoir of history (cloud.replay); new fault classes extend
  the label space. Optionally the teacher first pseudo-labels unlabelled uploads above a
  confidence bar (recorded with source ``teacher``).
- **recompress**: the teacher → the exact package a device of the profile runs (the
  compression pipeline for a profile of cloud/profiles.toml; the teacher as it is for
  ``cpu-fp32``).
- **evaluate**: that package under ONNX Runtime, on the frozen golden set and a held-out
  slice of the new uploads; the gates.
- **register**: MLflow run (params, loss per epoch, metrics, plots, lineage, package) and a
  model version with its tags; ``champion`` only if the gates passed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import exists, func, select, text
from sqlalchemy.orm import sessionmaker
import torch
from torch import nn

from cloud.datasets import LabelledWindows, label_indices, load_dataset
from cloud.db import Label, ModelVersion, Sample
from cloud.ingest import load_window
from cloud.metrics import classification_metrics
from cloud.registry import Registry, model_name
from cloud.replay import ReplayBuffer
from cloud.storage import ObjectStore
from cloud.training import (
    ModelConfig,
    TrainConfig,
    WindowClassifier,
    build_model,
    extend_classes,
    ood_calibration,
    package_model,
    train,
)
from cloud.triggers import fleet_anomaly_rate
from shared.errors import ConfigError, DataError

log = logging.getLogger(__name__)
NORMAL = "normal"  # class index 0 of every model: what the plant does when nothing is wrong
STAGES = ("train", "recompress", "evaluate", "register")
SOURCE_RANK = {"operator": 0, "device": 1, "teacher": 2}  # whose label wins


@dataclass
class RoundConfig:
    fleet: str
    profile: str = "cpu-fp32"
    base_dataset: str = "base"  # the registered history the first replay buffer holds
    golden_dataset: str = "golden"
    replay_per_class: int = 120
    holdout_fraction: float = 0.25  # of new labelled samples, kept out of training for gates
    max_old_f1_drop_pts: float = 3.0
    # Share of the golden set's fault windows (of any fault, known or not) that the model
    # flags as not normal: a missed alarm is the costliest error in a plant.
    max_detection_drop_pts: float = 3.0
    min_new_recall: float = 0.5
    # None: no pseudo-labels. Else unlabelled uploads the teacher classifies with at least
    # this softmax probability are labelled by it (source "teacher") before training.
    pseudo_label_min_confidence: float | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=25, lr=2e-3))
    distill_epochs: int = 30  # student recovery in the compression pipeline
    # The initial round's teacher: None for the CNN, else cloud.models.ModelSpec fields
    # (a transformer, which the compression pipeline can prune).
    teacher: dict[str, Any] | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundConfig:
        raw = dict(raw)  # a row written before settings were kept has none: defaults
        if "train" in raw:
            raw["train"] = TrainConfig(**raw["train"])
        return cls(**raw)


@dataclass
class Services:
    sessions: sessionmaker
    store: ObjectStore
    registry: Registry


@dataclass
class RoundState:
    """What a stage knows of its round: who, its settings, the outputs of earlier stages."""

    id: int
    fleet: str
    profile: str
    version: str
    initial: bool
    cfg: RoundConfig
    outputs: dict[str, dict[str, Any]]


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


# -- keys in the object store -----------------------------------------------------------------


def checkpoint_key(fleet: str, profile: str, version: str) -> str:
    return f"checkpoints/{fleet}/{profile}/{version}.safetensors"


def replay_key(fleet: str, profile: str, version: str) -> str:
    return f"replay/{fleet}/{profile}/{version}.json"


def package_key(fleet: str, profile: str, version: str) -> str:
    return f"packages/{fleet}/{profile}/{version}.edgepkg"


# -- checkpoints: what is needed to rebuild the teacher, never pickle -------------------------


def save_checkpoint(store: ObjectStore, key: str, model: nn.Module, class_names: list[str]) -> None:
    if isinstance(model, WindowClassifier):
        meta = {
            "model_config": json.dumps(asdict(model.cfg)),
            "class_names": json.dumps(class_names),
        }
        store.put(key, save_safetensors(model.state_dict(), metadata=meta))
    else:
        from cloud.models import to_bytes

        store.put(key, to_bytes(model, class_names))  # type: ignore[arg-type]


def load_checkpoint(store: ObjectStore, key: str) -> tuple[nn.Module, list[str]]:
    data = store.get(key)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    if "model_spec" in meta:
        from cloud.models import from_bytes

        return from_bytes(data)
    # safetensors holds tensors only: nothing in a checkpoint can run code on load.
    model = WindowClassifier(ModelConfig(**json.loads(meta["model_config"])))
    model.load_state_dict(load_safetensors(data))
    model.eval()
    return model, json.loads(meta["class_names"])


# -- data -------------------------------------------------------------------------------------


@dataclass
class Upload:
    sample_id: str
    sha256: str
    object_key: str
    object_index: int | None
    label: str
    source: str
    label_id: int


def labelled_uploads(*, sessions: sessionmaker, fleet: str, upto: int) -> list[Upload]:
    """Every uploaded window of ``fleet`` with a label of id ≤ ``upto``, with the label that
    wins (an operator's over a device's over a teacher's), in sample id order."""
    with sessions() as session:
        rows = session.execute(
            select(
                Sample.id,
                Sample.content_sha256,
                Sample.object_key,
                Sample.object_index,
                Label.label,
                Label.source,
                Label.id.label("label_id"),
            )
            .join(Label, Label.sample_id == Sample.id)
            .where(Sample.fleet == fleet, Label.id <= upto)
        ).all()
    best: dict[str, Any] = {}
    for r in rows:
        if r.id not in best or SOURCE_RANK[r.source] < SOURCE_RANK[best[r.id].source]:
            best[r.id] = r
    return [
        Upload(r.id, r.content_sha256, r.object_key, r.object_index, r.label, r.source, r.label_id)
        for r in sorted(best.values(), key=lambda r: r.id)
    ]


def load_samples(*, sessions: sessionmaker, store: ObjectStore, ids: list[str]) -> np.ndarray:
    """The windows of uploaded samples ``ids``, in that order; each object read once."""
    if not ids:
        return np.empty((0, 1, 1), np.float32)
    with sessions() as session:
        rows = {
            r.id: r
            for r in session.execute(
                select(Sample.id, Sample.object_key, Sample.object_index).where(Sample.id.in_(ids))
            ).all()
        }
    missing = [i for i in ids if i not in rows]
    if missing:
        raise DataError(f"{len(missing)} sample(s) are gone from the database: {missing[:3]}")
    objects = {key: load_window(store, key) for key in {r.object_key for r in rows.values()}}
    return np.stack(
        [
            objects[r.object_key]
            if r.object_index is None
            else objects[r.object_key][r.object_index]
            for r in (rows[i] for i in ids)
        ]
    ).astype(np.float32)


def load_keys(
    *, sessions: sessionmaker, store: ObjectStore, base: LabelledWindows, keys: list[str]
) -> np.ndarray:
    """Windows by replay key: ``base:<i>`` from the base data set, ``sample:<id>`` uploaded."""
    base_idx = [(n, int(k[5:])) for n, k in enumerate(keys) if k.startswith("base:")]
    sample_ids = [(n, k[7:]) for n, k in enumerate(keys) if k.startswith("sample:")]
    out = np.empty((len(keys), *base.x.shape[1:]), np.float32)
    if base_idx:
        out[[n for n, _ in base_idx]] = base.x[[i for _, i in base_idx]]
    if sample_ids:
        out[[n for n, _ in sample_ids]] = load_samples(
            sessions=sessions, store=store, ids=[i for _, i in sample_ids]
        )
    return out


def held_out(sha256: str, fraction: float) -> bool:
    """By content hash: a window stays on the same side in every round, so a parent never
    saw the windows its successor is judged on."""
    return int(sha256[:8], 16) / 2**32 < fraction


def class_order(labels: list[str]) -> list[str]:
    return sorted(set(labels), key=lambda c: (c != NORMAL, c))


def champion_row(sessions: sessionmaker, fleet: str, profile: str) -> ModelVersion | None:
    """The newest version of the fleet's model that passed its gates."""
    with sessions() as session:
        rows = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == model_name(fleet, profile))
            .order_by(ModelVersion.id.desc())
        ).all()
    return next((r for r in rows if (r.gates or {}).get("passed")), None)


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


def label_watermark(sessions: sessionmaker) -> int:
    """The highest label id such that every label up to it is committed: what a round
    learns from, and where the triggers start counting new labels. On PostgreSQL, ids are
    handed out before commit, so a lower id can still be in flight when a higher one is
    visible; a SHARE lock on the table waits for the writers that hold one."""
    from sqlalchemy.exc import OperationalError

    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL lock_timeout = '15s'"))
            try:
                session.execute(text("LOCK TABLE labels IN SHARE MODE"))
            except OperationalError as exc:
                raise DataError(
                    "the labels table stayed locked for 15 s (a transaction writing labels "
                    "left open?); the round stops, resume it once that transaction ends"
                ) from exc
        watermark = session.scalar(select(func.max(Label.id))) or 0
        session.commit()  # releases the lock
    return int(watermark)


# -- stage 1: train ---------------------------------------------------------------------------


def stage_train(svc: Services, st: RoundState, say: Callable[[str], None]) -> dict[str, Any]:
    cfg = st.cfg
    base = load_dataset(store=svc.store, name=cfg.base_dataset)
    if st.initial:
        return _train_initial(svc, st, base, say)
    parent_row = champion_row(svc.sessions, st.fleet, st.profile)
    if parent_row is None:
        raise DataError(f"fleet {st.fleet} has no promoted model yet; train the initial one first")
    parent = parent_row.version
    _same_base(svc.sessions, st, parent, base)
    teacher, old_classes = load_checkpoint(svc.store, checkpoint_key(st.fleet, st.profile, parent))
    pseudo = 0
    if cfg.pseudo_label_min_confidence is not None:
        pseudo = pseudo_label(
            svc, st.fleet, teacher, old_classes, cfg.pseudo_label_min_confidence, say
        )
    # Labels up to this id are what this round learns from; the triggers count what
    # arrives after it (also while the round trains) as new.
    watermark = label_watermark(svc.sessions)
    since = int((parent_row.gates or {}).get("label_watermark") or 0)
    new = [
        u
        for u in labelled_uploads(sessions=svc.sessions, fleet=st.fleet, upto=watermark)
        if u.label_id > since
    ]
    if not new:
        raise DataError(f"fleet {st.fleet} has no labelled uploads since {parent} to learn from")
    new_classes = sorted({u.label for u in new} - set(old_classes))
    class_names = old_classes + new_classes
    # Ground truth only in the held-out slice: a teacher's label is no evidence.
    hold = [u for u in new if u.source != "teacher" and held_out(u.sha256, cfg.holdout_fraction)]
    held_ids = {u.sample_id for u in hold}
    fit = [u for u in new if u.sample_id not in held_ids]

    buffer = _load_buffer(svc.store, st.fleet, st.profile, parent) or _base_buffer(base, cfg)
    # A window with a new label (relabelled since it was learnt) is learnt, or held out,
    # with that label this round: never replayed with its old one as well.
    relabelled = {f"sample:{u.sample_id}" for u in new}
    replay = [(k, c) for k, c in buffer.windows() if k not in relabelled]
    say(
        f"training {st.version} from {parent}: {len(fit)} new window(s) "
        f"({len(hold)} held out), {len(replay)} replayed, classes +{new_classes or '[]'}"
    )
    x = np.concatenate(
        [
            load_samples(sessions=svc.sessions, store=svc.store, ids=[u.sample_id for u in fit]),
            load_keys(
                sessions=svc.sessions, store=svc.store, base=base, keys=[k for k, _ in replay]
            ),
        ]
    )
    labels = np.array([u.label for u in fit] + [c for _, c in replay])
    y = LabelledWindows(x, labels).indices(class_names)
    model = extend_classes(copy.deepcopy(teacher), len(class_names))
    history: list[float] = []
    train(model, x, y, cfg.train, on_epoch=_epochs(history, cfg.train.epochs, say))
    save_checkpoint(svc.store, checkpoint_key(st.fleet, st.profile, st.version), model, class_names)
    # What this round learnt joins history: its own buffer is the parent's plus these.
    mine = buffer.copy().offer_all((f"sample:{u.sample_id}", u.label) for u in fit)
    svc.store.put(replay_key(st.fleet, st.profile, st.version), mine.to_json())
    return {
        "parent": parent,
        "class_names": class_names,
        "new_classes": new_classes,
        "label_watermark": watermark,
        "history": history,
        "samples_used": len(x),
        # (sample id, the label learnt): later stages read these, never the labels
        # table, which may have changed since
        "fit": [[u.sample_id, u.label] for u in fit],
        "holdout": [[u.sample_id, u.label] for u in hold],
        "replay": [list(p) for p in replay],
        "lineage": {
            "parent": parent,
            "label_watermark": watermark,
            "base": base.sha256(),
            "uploads": sorted({u.sha256 for u in fit}),
            "holdout": sorted({u.sha256 for u in hold}),
            "labels_by_source": _count(u.source for u in fit),
            "pseudo_labelled": pseudo,
            "replay_windows": len(replay),
            "replay_by_class": _count(c for _, c in replay),
        },
    }


def _train_initial(
    svc: Services, st: RoundState, base: LabelledWindows, say: Callable[[str], None]
) -> dict[str, Any]:
    """Round 0: a model for the base data set's classes."""
    cfg = st.cfg
    if NORMAL not in set(base.labels.tolist()):
        raise DataError(
            f"data set {cfg.base_dataset!r} has no {NORMAL!r} windows; the model "
            "and its out-of-distribution score are calibrated on normal operation"
        )
    class_names = class_order(base.labels.tolist())
    y = base.indices(class_names)
    model: nn.Module
    if cfg.teacher is None:
        torch.manual_seed(cfg.seed)  # the initial weights: the same on every run
        model = build_model(
            ModelConfig(
                window=base.x.shape[1], channels=base.x.shape[2], n_classes=len(class_names)
            ),
            base.x[y == 0],
        )
    else:
        from cloud.models import ModelSpec, build

        spec = ModelSpec(
            **{
                **cfg.teacher,
                "window": base.x.shape[1],
                "channels": base.x.shape[2],
                "n_classes": len(class_names),
            }
        )
        model = build(spec, base.x[y == 0])
    say(f"training the initial model {st.version}: {len(base)} windows, {len(class_names)} classes")
    history: list[float] = []
    train(model, base.x, y, cfg.train, on_epoch=_epochs(history, cfg.train.epochs, say))
    save_checkpoint(svc.store, checkpoint_key(st.fleet, st.profile, st.version), model, class_names)
    svc.store.put(replay_key(st.fleet, st.profile, st.version), _base_buffer(base, cfg).to_json())
    return {
        "parent": None,
        "class_names": class_names,
        "new_classes": class_names,
        "label_watermark": None,
        "history": history,
        "samples_used": len(base),
        "fit": [],
        "holdout": [],
        "replay": [],
        "whole_base": True,
        "lineage": {"base": base.sha256(), "base_windows": len(base)},
    }


def pseudo_label(
    svc: Services,
    fleet: str,
    teacher: nn.Module,
    class_names: list[str],
    min_confidence: float,
    say: Callable[[str], None],
    *,
    limit: int = 20_000,
    batch: int = 512,
) -> int:
    """Label the fleet's unlabelled uploads that ``teacher`` is at least ``min_confidence``
    sure of (softmax probability), as source ``teacher`` with that confidence: the newest
    ``limit`` of them, scored ``batch`` at a time. Pseudo-labels are the fleet's: a window
    another profile's teacher labelled first keeps that label."""
    import torch
    from sqlalchemy.dialects import postgresql, sqlite

    with svc.sessions() as session:
        ids = session.scalars(
            select(Sample.id)
            .where(Sample.fleet == fleet, ~exists().where(Label.sample_id == Sample.id))
            .order_by(Sample.received_at.desc(), Sample.id)
            .limit(limit)
        ).all()
        dialect = session.get_bind().dialect.name
    teacher.eval()
    rows = []
    for start in range(0, len(ids), batch):
        chunk = list(ids[start : start + batch])
        x = load_samples(sessions=svc.sessions, store=svc.store, ids=chunk)
        with torch.no_grad():
            prob = torch.softmax(teacher(torch.as_tensor(x)), dim=1).numpy()
        rows += [
            {
                "sample_id": chunk[i],
                "label": class_names[int(prob[i].argmax())],
                "source": "teacher",
                "confidence": float(prob[i].max()),
            }
            for i in np.flatnonzero(prob.max(1) >= min_confidence)
        ]
    if rows:
        dml = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
        with svc.sessions() as session:
            # Another round of the fleet (another profile) may be labelling the same ones.
            # In pages: one statement may carry only so many values (SQLite: 32,766).
            for start in range(0, len(rows), 1000):
                session.execute(
                    dml(Label).values(rows[start : start + 1000]).on_conflict_do_nothing()
                )
            session.commit()
    say(f"pseudo-labelled {len(rows)} of {len(ids)} unlabelled upload(s) at ≥ {min_confidence}")
    return len(rows)


def _same_base(sessions: sessionmaker, st: RoundState, parent: str, base: LabelledWindows) -> None:
    """Replay keys ``base:<i>`` are positions in the base data set the parent's reservoir
    was drawn from: if the set registered under that name changed since, they no longer
    name the same windows."""
    from cloud.db import Round

    with sessions() as session:
        row = session.scalar(
            select(Round).where(
                Round.fleet == st.fleet,
                Round.profile == st.profile,
                Round.version == parent,
                Round.state == "done",
            )
        )
    lineage = (
        ((row.stages or {}).get("train", {}).get("output") or {}).get("lineage", {}) if row else {}
    )
    if lineage.get("base") not in (None, base.sha256()):
        raise DataError(
            f"data set {st.cfg.base_dataset!r} changed since {parent} drew its replay "
            "reservoir from it; register the new history under another name (or restore "
            "the old one)"
        )


def _base_buffer(base: LabelledWindows, cfg: RoundConfig) -> ReplayBuffer:
    return ReplayBuffer(per_class=cfg.replay_per_class, seed=cfg.seed).offer_all(
        (f"base:{i}", str(c)) for i, c in enumerate(base.labels)
    )


def _load_buffer(store: ObjectStore, fleet: str, profile: str, version: str) -> ReplayBuffer | None:
    key = replay_key(fleet, profile, version)
    return ReplayBuffer.from_json(store.get(key)) if store.exists(key) else None


def _epochs(history: list[float], epochs: int, say: Callable[[str], None]) -> Any:
    def on_epoch(i: int, loss: float) -> None:
        history.append(loss)
        if (i + 1) % 5 == 0 or i + 1 == epochs:
            say(f"  epoch {i + 1}/{epochs} loss {loss:.4f}")

    return on_epoch


def _count(items: Any) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))


# -- stage 2: recompress ----------------------------------------------------------------------


def stage_recompress(svc: Services, st: RoundState, say: Callable[[str], None]) -> dict[str, Any]:
    from cloud.profiles import load_profiles
    from shared.package import ModelPackage

    trained = st.outputs["train"]
    teacher, class_names = load_checkpoint(
        svc.store, checkpoint_key(st.fleet, st.profile, st.version)
    )
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
        from cloud.compression import DistillConfig, compress
        from cloud.models import SensorTransformer

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
        golden = _golden(svc, st.cfg, class_names)
        result = compress(
            teacher,  # type: ignore[arg-type]
            x=x,
            y=LabelledWindows(x, labels).indices(class_names),
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
        package = result.package
        summary = result.summary()
    key = package_key(st.fleet, st.profile, st.version)
    svc.store.put(key, package)
    return {
        "package_key": key,
        "sha256": ModelPackage(package).sha256,
        "bytes": len(package),
        "compression": summary,
    }


def _golden(svc: Services, cfg: RoundConfig, class_names: list[str]) -> LabelledWindows:
    """The golden set's windows of the classes the model knows."""
    golden = load_dataset(store=svc.store, name=cfg.golden_dataset)
    known = np.isin(golden.labels, class_names)
    return LabelledWindows(golden.x[known], golden.labels[known])


# -- stage 3: evaluate ------------------------------------------------------------------------


def stage_evaluate(svc: Services, st: RoundState, say: Callable[[str], None]) -> dict[str, Any]:
    """The gates, measured on the package a device will run (ONNX Runtime), never on the
    torch model it came from."""
    from cloud.evaluation import latency_ms, package_predict, predict, session
    from cloud.profiles import load_profiles
    from shared.package import ModelPackage

    cfg, trained = st.cfg, st.outputs["train"]
    package = svc.store.get(st.outputs["recompress"]["package_key"])
    class_names = list(ModelPackage(package).manifest.class_names)
    profile = load_profiles().get(st.profile)
    threads = profile.threads if profile is not None else 1
    golden = load_dataset(store=svc.store, name=cfg.golden_dataset)
    # One ONNX Runtime session for every measure of the candidate.
    sess = session(ModelPackage(package).graph, threads)
    pred = predict(sess, golden.x)
    known = np.isin(golden.labels, class_names)
    gy = label_indices(golden.labels[known], class_names)
    ev = classification_metrics(gy, pred[known], class_names)
    metrics = ev.metrics("golden")
    faults = golden.labels != class_names[0]
    detection = float((pred[faults] != 0).mean()) if faults.any() else float("nan")
    metrics["golden_detection_rate"] = detection
    name = sess.get_inputs()[0].name
    p50, p99 = latency_ms(lambda w: sess.run(["logits"], {name: w}), golden.x, 100)
    metrics.update(latency_p50_ms=p50, latency_p99_ms=p99, package_kb=len(package) / 1024)
    gates: dict[str, Any] = {"golden_macro_f1": ev.macro_f1, "detection_rate": detection}
    failed: list[str] = []
    parent = trained["parent"]
    if parent is not None:
        parent_row = _version_row(svc.sessions, st.fleet, st.profile, parent)
        parent_pkg = svc.store.get(parent_row.object_key)
        pclasses = list(parent_row.class_names)
        ppred = package_predict(parent_pkg, golden.x, threads=threads)
        det_before = float((ppred[faults] != 0).mean()) if faults.any() else float("nan")
        det_drop = 100 * (det_before - detection)
        gates.update(
            detection_rate_before=det_before,
            detection_drop_pts=det_drop,
            max_detection_drop_pts=cfg.max_detection_drop_pts,
        )
        if det_drop > cfg.max_detection_drop_pts:
            failed.append(
                f"detection rate fell {det_drop:.1f} pts (> {cfg.max_detection_drop_pts})"
            )
        old = np.isin(golden.labels, pclasses)
        old_labels = golden.labels[old]
        before = classification_metrics(
            label_indices(old_labels, pclasses), ppred[old], pclasses
        ).macro_f1
        after = classification_metrics(
            label_indices(old_labels, class_names), pred[old], class_names
        ).macro_f1
        drop = 100 * (before - after)
        gates.update(
            old_f1_before=before,
            old_f1_after=after,
            old_f1_drop_pts=drop,
            max_old_f1_drop_pts=cfg.max_old_f1_drop_pts,
        )
        if drop > cfg.max_old_f1_drop_pts:
            failed.append(
                f"old classes' macro-F1 fell {drop:.1f} pts (> {cfg.max_old_f1_drop_pts})"
            )
        metrics["old_f1_drop_pts"] = drop
    if trained["holdout"]:
        hx = load_samples(
            sessions=svc.sessions, store=svc.store, ids=[i for i, _ in trained["holdout"]]
        )
        hlabels = [c for _, c in trained["holdout"]]
        hev = classification_metrics(
            label_indices(np.array(hlabels), class_names),
            predict(sess, hx),
            class_names,
        )
        new_recall = {c: hev.recall[c] for c in trained["new_classes"] if c in hev.recall}
        gates["holdout_new_recall"] = new_recall
        gates["min_new_recall"] = cfg.min_new_recall
        failed += [
            f"held-out recall of {c} is {v:.2f} (< {cfg.min_new_recall})"
            for c, v in new_recall.items()
            if v < cfg.min_new_recall
        ]
        metrics.update({f"holdout_recall_{k}": v for k, v in new_recall.items()})
    gates["passed"] = not failed
    gates["failed"] = failed
    say(
        f"gates {'passed' if not failed else 'failed: ' + '; '.join(failed)} "
        f"(golden macro-F1 {ev.macro_f1:.3f}, detection {detection:.3f})"
    )
    return {
        "metrics": metrics,
        "gates": gates,
        "confusion": ev.confusion.tolist(),
        "class_names": class_names,
    }


def _version_row(sessions: sessionmaker, fleet: str, profile: str, version: str) -> ModelVersion:
    with sessions() as session:
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.name == model_name(fleet, profile), ModelVersion.version == version
            )
        )
    if row is None:
        raise DataError(f"{model_name(fleet, profile)} has no version {version}")
    return row


# -- stage 4: register ------------------------------------------------------------------------


def stage_register(svc: Services, st: RoundState, say: Callable[[str], None]) -> dict[str, Any]:
    """MLflow run and model version, then the row the triggers and the publisher read. A
    round that died after registering finds its version in MLflow and only records it."""
    trained, packaged, evaluated = (st.outputs[s] for s in ("train", "recompress", "evaluate"))
    gates = evaluated["gates"]
    found = svc.registry.find_version(st.fleet, st.profile, st.version)
    if found is not None:
        mlflow_version, tags = found
        if tags.get("sha256") != packaged["sha256"]:
            raise RuntimeError(
                f"MLflow already holds {model_name(st.fleet, st.profile)} {st.version} "
                f"(version {mlflow_version}) with another package (sha256 "
                f"{tags.get('sha256', '?')[:12]}…, this round's is {packaged['sha256'][:12]}…); "
                "delete that model version in MLflow, then resume this round"
            )
        # The aliases may not have been set before the crash: set them now.
        svc.registry.set_aliases(
            model_name(st.fleet, st.profile), mlflow_version, champion=bool(gates["passed"])
        )
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
            metrics=metrics,
            class_names=evaluated["class_names"],
            confusion=np.array(evaluated["confusion"]),
            lineage={**trained["lineage"], "compression": packaged["compression"]},
            package=package,
        )
        mlflow_version = svc.registry.register(
            fleet=st.fleet, run_id=run_id, package=package, gates=gates, promote=gates["passed"]
        ).mlflow_version
    name = model_name(st.fleet, st.profile)
    with svc.sessions() as session:
        exists = session.scalar(
            select(ModelVersion).where(
                ModelVersion.name == name, ModelVersion.version == st.version
            )
        )
        if exists is None:
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
                    # Not gates: the fleet's anomaly rate now and the last label learnt
                    # from, the triggers' baselines.
                    gates={
                        **gates,
                        "fleet_anomaly_rate": fleet_anomaly_rate(session, st.fleet, st.profile),
                        "label_watermark": trained["label_watermark"],
                    },
                )
            )
            session.commit()
    return {"mlflow_version": mlflow_version, "promoted": bool(gates["passed"])}


STAGE_FUNCTIONS: dict[str, Callable[[Services, RoundState, Callable[[str], None]], dict]] = {
    "train": stage_train,
    "recompress": stage_recompress,
    "evaluate": stage_evaluate,
    "register": stage_register,
}


def summary(st: RoundState) -> dict[str, Any]:
    """A finished round's answer, from its stages' outputs."""
    trained, evaluated, registered = (st.outputs[s] for s in ("train", "evaluate", "register"))
    return {
        "version": st.version,
        "parent": trained["parent"],
        "class_names": trained["class_names"],
        "new_classes": trained["new_classes"],
        "samples_used": trained["samples_used"],
        "gates": evaluated["gates"],
        "promoted": registered["promoted"],
        "mlflow_version": registered["mlflow_version"],
        "package_key": st.outputs["recompress"]["package_key"],
    }


# -- in this process --------------------------------------------------------------------------


def run_round(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    cfg: RoundConfig,
    progress: Callable[[str], None] | None = None,
    initial: bool = False,
) -> RoundResult:
    """One round with every stage in this process (the demo, which has no Celery worker):
    the same stages and bookkeeping as the Celery chain. ``initial``: round 0, a model for
    the base data set's classes (train_initial)."""
    import uuid

    from cloud import rounds

    t0 = time.perf_counter()
    svc = Services(sessions, store, registry)
    row = rounds.reserve(
        sessions=sessions,
        task_id=f"local-{uuid.uuid4()}",
        fleet=cfg.fleet,
        profile=cfg.profile,
        reason="initial" if initial else "manual (in process)",
        config=cfg.to_dict(),
    )
    for stage in STAGES:
        rounds.run_stage(svc, row.id, stage, say=progress)
    st = rounds.state_of(sessions, row.id)
    out = summary(st)
    return RoundResult(
        version=out["version"],
        parent=out["parent"],
        class_names=out["class_names"],
        new_classes=out["new_classes"],
        samples_used=out["samples_used"],
        gates=out["gates"],
        promoted=out["promoted"],
        package=store.get(out["package_key"]),
        mlflow_version=out["mlflow_version"],
        seconds=time.perf_counter() - t0,
    )


def train_initial(**kwargs: Any) -> RoundResult:
    """Round 0: a model for the base data set's classes, registered as champion (the
    arguments of run_round)."""
    return run_round(**kwargs, initial=True)
