"""What a round reads and keeps: the labelled uploads it learns from (and which it holds
out), its teacher's checkpoint, its replay reservoir, and the golden set."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
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


PAGE_ROWS = 1000  # label rows read from PostgreSQL at a time


def labelled_uploads(
    *,
    sessions: sessionmaker,
    fleet: str,
    upto: int,
    since: int = 0,
    cap: int | None = None,
    seed: int = 0,
) -> list[Upload]:
    """The uploaded windows of ``fleet`` whose winning label (an operator's over a device's
    over a teacher's, among labels of id ≤ ``upto``) is newer than ``since``, in sample id
    order: what a round learns from.

    Read in pages of PAGE_ROWS label rows, never all at once. With ``cap``, at most that
    many: each class keeps a reservoir (Algorithm R, ``random.Random(seed)``, so a round
    rerun picks the same windows) and, past the cap, the classes share it evenly, a class
    with fewer windows than its share giving the rest to the others. What is held meanwhile
    is the rows' ids and labels, at most ``cap`` per class; the windows themselves are
    loaded later, for the chosen ones only."""
    rng = random.Random(seed)
    kept: dict[str, list[Upload]] = {}
    seen: dict[str, int] = {}
    for upload in _winners(sessions, fleet, upto, since):
        n = seen[upload.label] = seen.get(upload.label, 0) + 1
        pool = kept.setdefault(upload.label, [])
        if cap is None or len(pool) < cap:
            pool.append(upload)
        elif (j := rng.randrange(n)) < cap:
            pool[j] = upload
    chosen: list[Upload] = []
    for label, share in _shares({c: len(p) for c, p in kept.items()}, cap).items():
        pool = kept[label]
        chosen += pool if share >= len(pool) else rng.sample(pool, share)
    return sorted(chosen, key=lambda u: u.sample_id)


def _winners(sessions: sessionmaker, fleet: str, upto: int, since: int) -> Iterator[Upload]:
    """Each sample with a label newer than ``since``, with its winning label, streamed."""
    newer = select(Label.sample_id).where(Label.id > since, Label.id <= upto)
    query = (
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
        .where(Sample.fleet == fleet, Label.id <= upto, Sample.id.in_(newer))
        .order_by(Sample.id)
        .execution_options(yield_per=PAGE_ROWS)
    )
    with sessions() as session:
        best = None
        for r in session.execute(query):
            if best is not None and r.id != best.id:
                if best.label_id > since:
                    yield _upload(best)
                best = None
            if best is None or SOURCE_RANK[r.source] < SOURCE_RANK[best.source]:
                best = r
        if best is not None and best.label_id > since:
            yield _upload(best)


def _upload(r: Any) -> Upload:
    return Upload(
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


def _shares(counts: dict[str, int], cap: int | None) -> dict[str, int]:
    """How many windows each class keeps so that all keep at most ``cap`` together, shared
    evenly (water-filling: the smallest classes keep all they have)."""
    if cap is None or sum(counts.values()) <= cap:
        return dict(counts)
    shares, left = {}, cap
    order = sorted(counts, key=lambda c: (counts[c], c))
    for i, label in enumerate(order):
        shares[label] = min(counts[label], left // (len(order) - i))
        left -= shares[label]
    return shares


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
