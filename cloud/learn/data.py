"""What a round reads and keeps: the labelled uploads it learns from (and which it holds
out), its teacher's checkpoint, its replay reservoir, and the golden set."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from torch import nn

from cloud.learn.replay import ReplayBuffer
from cloud.learn.state import NORMAL, RoundConfig, RoundState
from cloud.model.checkpoint import from_bytes, to_bytes
from cloud.model.classifier import Classifier
from cloud.store.datasets import LabelledWindows, load_dataset
from cloud.store.db import Label, Round, Sample, aware
from cloud.store.keys import checkpoint_key, replay_key
from cloud.store.objects import ObjectNotFound, ObjectStore
from cloud.store.windows import load_samples
from shared.errors import DataError

SOURCE_RANK = {"operator": 0, "device": 1, "teacher": 2}  # whose label wins


@dataclass
class Upload:
    sample_id: str
    sha256: str
    object_key: str
    object_index: int | None
    label: str
    source: str
    label_id: int
    device_id: str
    captured_at: datetime  # the window's last sample (cloud.learn.split)


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
                Sample.device_id,
                Sample.captured_at,
            )
            .join(Label, Label.sample_id == Sample.id)
            .where(Sample.fleet == fleet, Label.id <= upto)
        ).all()
    best: dict[str, Any] = {}
    for r in rows:
        if r.id not in best or SOURCE_RANK[r.source] < SOURCE_RANK[best[r.id].source]:
            best[r.id] = r
    return [
        Upload(
            r.id,
            r.content_sha256,
            r.object_key,
            r.object_index,
            r.label,
            r.source,
            r.label_id,
            r.device_id,
            aware(r.captured_at),
        )
        for r in sorted(best.values(), key=lambda r: r.id)
    ]


def class_order(labels: list[str]) -> list[str]:
    return sorted(set(labels), key=lambda c: (c != NORMAL, c))


# -- the teacher and its reservoir, per round ---------------------------------------------------


def save_teacher(
    store: ObjectStore, st: RoundState, model: nn.Module, class_names: list[str]
) -> None:
    store.put(checkpoint_key(st.fleet, st.profile, st.version), to_bytes(model, class_names))


def load_teacher(
    store: ObjectStore, fleet: str, profile: str, version: str
) -> tuple[Classifier, list[str]]:
    return from_bytes(store.get(checkpoint_key(fleet, profile, version)))


def base_buffer(base: LabelledWindows, cfg: RoundConfig) -> ReplayBuffer:
    """The first reservoir: drawn from the registered base data set."""
    return ReplayBuffer(per_class=cfg.replay_per_class, seed=cfg.seed).offer_all(
        (f"base:{i}", str(c)) for i, c in enumerate(base.labels)
    )


def load_buffer(store: ObjectStore, fleet: str, profile: str, version: str) -> ReplayBuffer | None:
    key = replay_key(fleet, profile, version)
    return ReplayBuffer.from_json(store.get(key)) if store.exists(key) else None


def check_same_base(
    sessions: sessionmaker, st: RoundState, parent: str, base: LabelledWindows
) -> None:
    """Replay keys ``base:<i>`` are positions in the base data set the parent's reservoir
    was drawn from: if the set registered under that name changed since, they no longer
    name the same windows."""
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


def validation_set(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    cfg: RoundConfig,
    class_names: list[str],
    uploads: list[list[str]],
    required: bool = True,
) -> LabelledWindows:
    """What a round chooses on: the registered validation set's windows of the classes the
    model knows, plus the round's own validation uploads ([sample id, label]: the new
    classes' only windows there). Not ``required`` (early stopping): without a registered
    set, the uploads alone (maybe nothing)."""
    registered = None
    if cfg.validation_dataset is not None:
        with contextlib.suppress(ObjectNotFound):
            registered = load_dataset(store=store, name=cfg.validation_dataset)
    if registered is None and required:
        raise DataError(
            f"profile {cfg.profile!r} compresses, and the compression chooses its student on "
            f"a validation set: register data set {cfg.validation_dataset or 'validation'!r} "
            f"(episodes of neither {cfg.base_dataset!r} nor {cfg.golden_dataset!r}) with "
            "`edgeloop cloud register-dataset` and name it in the round's validation_dataset"
        )
    xs, labels = [], []
    if registered is not None:
        known = np.isin(registered.labels, class_names)
        xs.append(registered.x[known])
        labels.append(registered.labels[known])
    if uploads:
        xs.append(load_samples(sessions=sessions, store=store, ids=[i for i, _ in uploads]))
        labels.append(np.array([c for _, c in uploads]))
    if not xs:
        return LabelledWindows(np.empty((0, 0, 0), np.float32), np.array([], dtype=str))
    return LabelledWindows(np.concatenate(xs), np.concatenate(labels))


def golden_known(store: ObjectStore, cfg: RoundConfig, class_names: list[str]) -> LabelledWindows:
    """The golden set's windows of the classes the model knows."""
    golden = load_dataset(store=store, name=cfg.golden_dataset)
    known = np.isin(golden.labels, class_names)
    return LabelledWindows(golden.x[known], golden.labels[known])
