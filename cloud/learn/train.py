"""The train stage: fine-tune the fleet's current teacher on the labels that arrived since
its round plus a class-balanced reservoir of history (cloud.learn.replay); new fault classes
extend the label space. Optionally the teacher first pseudo-labels unlabelled uploads
above a confidence bar (recorded with source ``teacher``). Round 0 trains the first model
on the registered base data set."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import exists, select
from sqlalchemy.dialects import postgresql, sqlite
from torch import nn

from cloud.learn.data import (
    Upload,
    base_buffer,
    check_same_base,
    class_order,
    labelled_uploads,
    load_buffer,
    load_teacher,
    save_teacher,
    validation_set,
)
from cloud.learn.split import SplitConfig, split_uploads
from cloud.learn.state import NORMAL, RoundState, Services, TrainOutput
from cloud.model.cnn import ModelConfig, build_model
from cloud.model.train import extend_classes, train
from cloud.model.transformer import ModelSpec, build
from cloud.store.datasets import LabelledWindows, load_dataset
from cloud.store.db import Label, ModelVersion, Sample
from cloud.store.keys import replay_key
from cloud.store.records import find_version, label_watermark
from cloud.store.windows import load_keys, load_samples
from shared.errors import DataError
from shared.package import model_name


def champion(svc: Services, fleet: str, profile: str) -> ModelVersion:
    """The version the registry's ``champion`` alias names: a round's parent. Not "the newest
    that passed": an operator who moved ``champion`` back in the MLflow UI (a rollback) has
    the next round learn from the model the fleet runs."""
    name = model_name(fleet, profile)
    found = svc.registry.champion(fleet, profile)
    if found is None:
        raise DataError(
            f"{name} has no champion in the registry; train and promote a first model "
            "(`edgeloop cloud init`)"
        )
    mlflow_version, tags = found
    with svc.sessions() as session:
        row = find_version(session, name, tags.get("edgeloop_version", ""))
    if row is None:
        raise DataError(
            f"{name}'s champion (MLflow version {mlflow_version}, "
            f"{tags.get('edgeloop_version', 'no edgeloop_version tag')}) was not registered by "
            "a round here; move the alias to a version a round registered"
        )
    return row


def stage_train(svc: Services, st: RoundState, say: Callable[[str], None]) -> TrainOutput:
    cfg = st.cfg
    base = load_dataset(store=svc.store, name=cfg.base_dataset)
    if st.initial:
        return _train_initial(svc, st, base, say)
    parent_row = champion(svc, st.fleet, st.profile)
    parent = parent_row.version
    check_same_base(svc.sessions, st, parent, base)
    teacher, old_classes = load_teacher(svc.store, st.fleet, st.profile, parent)
    pseudo = 0
    if cfg.pseudo_label_min_confidence is not None:
        pseudo = pseudo_label(
            svc, st.fleet, teacher, old_classes, cfg.pseudo_label_min_confidence, say
        )
    # Labels up to this id are what this round learns from; the triggers count what
    # arrives after it (also while the round trains) as new.
    watermark = label_watermark(svc.sessions)
    since = int((parent_row.baselines or {}).get("label_watermark") or 0)
    new = labelled_uploads(
        sessions=svc.sessions,
        fleet=st.fleet,
        upto=watermark,
        since=since,
        cap=cfg.max_windows,
        seed=cfg.seed,
    )
    if not new:
        raise DataError(f"fleet {st.fleet} has no labelled uploads since {parent} to learn from")
    buffer = load_buffer(svc.store, st.fleet, st.profile, parent) or base_buffer(base, cfg)
    plan = plan_round(new, buffer.windows(), old_classes, cfg.split)
    fit, hold, replay, new_classes = plan.fit, plan.hold, plan.replay, plan.new_classes
    class_names = old_classes + new_classes
    say(
        f"training {st.version} from {parent}: {len(fit)} new window(s) "
        f"({len(hold)} held out, {len(plan.val)} for validation, {len(plan.gap)} in gaps), "
        f"{len(replay)} replayed, classes +{new_classes or '[]'}"
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
    val = validation_set(
        sessions=svc.sessions,
        store=svc.store,
        cfg=cfg,
        class_names=class_names,
        uploads=[[u.sample_id, u.label] for u in plan.val],
        required=False,
    )
    val_f1: list[float] = []
    train(
        model,
        x,
        y,
        cfg.train,
        on_epoch=_epochs(history, cfg.train.epochs, say),
        **_early_stopping(val, class_names, val_f1, say),
    )
    save_teacher(svc.store, st, model, class_names)
    # What this round learnt joins history: its own buffer is the parent's plus these.
    mine = buffer.copy().offer_all((f"sample:{u.sample_id}", u.label) for u in fit)
    svc.store.put(replay_key(st.fleet, st.profile, st.version), mine.to_json())
    return {
        "parent": parent,
        "class_names": class_names,
        "new_classes": new_classes,
        "label_watermark": watermark,
        "history": history,
        "val_f1": val_f1,
        "samples_used": len(x),
        # (sample id, the label learnt): later stages read these, never the labels
        # table, which may have changed since
        "fit": [[u.sample_id, u.label] for u in fit],
        "validation": [[u.sample_id, u.label] for u in plan.val],
        "holdout": [[u.sample_id, u.label] for u in hold],
        "replay": [list(p) for p in replay],
        "lineage": {
            "parent": parent,
            "label_watermark": watermark,
            "base": base.sha256(),
            "uploads": sorted({u.sha256 for u in fit}),
            "validation": sorted({u.sha256 for u in plan.val}),
            "holdout": sorted({u.sha256 for u in hold}),
            "gap_windows": len(plan.gap),
            "labels_by_source": _count(u.source for u in fit),
            "pseudo_labelled": pseudo,
            "replay_windows": len(replay),
            "replay_by_class": _count(c for _, c in replay),
        },
    }


@dataclass
class RoundPlan:
    fit: list[Upload]  # new labelled windows the round learns from
    val: list[Upload]  # new labelled windows for choices (the compression's student)
    hold: list[Upload]  # new labelled windows kept out, for the gates
    gap: list[Upload]  # left out of this round: too close in time to another side
    replay: list[tuple[str, str]]  # (replay key, class) of history replayed
    new_classes: list[str]  # classes the parent did not know, sorted


def plan_round(
    new: list[Upload],
    reservoir: list[tuple[str, str]],
    old_classes: list[str],
    split: SplitConfig,
) -> RoundPlan:
    """Which of the ``new`` labelled uploads a round learns from, which it keeps for
    validation and which it holds out (by device and time block, no sample shared:
    cloud.learn.split), and which of the parent's ``reservoir`` it replays."""
    split.check()
    sides = split_uploads(new, split)
    # Ground truth only on the validation and held-out sides: a teacher's label is no
    # evidence. A pseudo-labelled window there is left out, not learnt: it shares samples
    # with the windows beside it.
    dropped = [u for u in sides.hold + sides.val if u.source == "teacher"]
    # A window with a new label (relabelled since it was learnt) is learnt, or held out,
    # with that label this round: never replayed with its old one as well.
    relabelled = {f"sample:{u.sample_id}" for u in new}
    return RoundPlan(
        fit=sides.fit,
        val=[u for u in sides.val if u.source != "teacher"],
        hold=[u for u in sides.hold if u.source != "teacher"],
        gap=sides.gap + dropped,
        replay=[(k, c) for k, c in reservoir if k not in relabelled],
        new_classes=sorted({u.label for u in new} - set(old_classes)),
    )


def _train_initial(
    svc: Services, st: RoundState, base: LabelledWindows, say: Callable[[str], None]
) -> TrainOutput:
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
    val = validation_set(
        sessions=svc.sessions,
        store=svc.store,
        cfg=cfg,
        class_names=class_names,
        uploads=[],
        required=False,
    )
    val_f1: list[float] = []
    train(
        model,
        base.x,
        y,
        cfg.train,
        on_epoch=_epochs(history, cfg.train.epochs, say),
        **_early_stopping(val, class_names, val_f1, say),
    )
    save_teacher(svc.store, st, model, class_names)
    svc.store.put(replay_key(st.fleet, st.profile, st.version), base_buffer(base, cfg).to_json())
    return {
        "parent": None,
        "class_names": class_names,
        "new_classes": class_names,
        "label_watermark": None,
        "history": history,
        "val_f1": val_f1,
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
        dml: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
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


def _epochs(history: list[float], epochs: int, say: Callable[[str], None]) -> Any:
    def on_epoch(i: int, loss: float) -> None:
        history.append(loss)
        if (i + 1) % 5 == 0 or i + 1 == epochs:
            say(f"  epoch {i + 1}/{epochs} loss {loss:.4f}")

    return on_epoch


def _early_stopping(
    val: LabelledWindows, class_names: list[str], scores: list[float], say: Callable[[str], None]
) -> dict[str, Any]:
    """train()'s arguments to keep the epoch that scores best on ``val`` (none: no set)."""
    if not len(val):
        say("  no validation windows: the last epoch's weights are kept")
        return {}

    def on_validate(epoch: int, f1: float) -> None:
        scores.append(f1)

    return {"val": (val.x, val.indices(class_names)), "on_validate": on_validate}


def _count(items: Any) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))
