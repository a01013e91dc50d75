"""A round's memory is bounded: it reads its labelled uploads in pages and loads at most
``round_max_windows`` windows (a class-balanced, seeded sample past it), on real
PostgreSQL and S3 with real TEP windows."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from cloud.learn import data as round_data
from cloud.learn.data import labelled_uploads
from cloud.store.db import Label, Sample, session_factory
from cloud.store.objects import ObjectStore
from cloud.store.records import register_device
from cloud.store.windows import content_sha256, load_samples, npy_bytes

from .conftest import windows_of

T0 = datetime(2026, 1, 4, tzinfo=UTC)
LAYOUT = {"normal": 40, "idv_01": 25, "idv_02": 8}  # 73 labelled uploads


class CountingStore:
    """The test's S3 store, counting the window objects read back (the process edge)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.windows_read = 0

    def get(self, key: str) -> bytes:
        self.windows_read += key.startswith("windows/")
        return self.store.get(key)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


@pytest.fixture
def uploads(pg_url, s3_store, fleet, tep_small):
    """73 real TEP windows uploaded by two devices and labelled by them; sample ids in
    upload order. Returns (sessions, store, {sample id: label})."""
    train, _ = tep_small
    sessions = session_factory(pg_url)
    labels: dict[str, str] = {}
    with sessions() as s:
        for device in ("d1", "d2"):
            register_device(session=s, device_id=device, fleet=fleet, profile="cpu-fp32")
        i = 0
        for label, n in LAYOUT.items():
            for w in windows_of(train, label, n):
                sha = content_sha256(w)
                s3_store.put(f"windows/{sha}.npy", npy_bytes(w))
                sid = f"00000000-0000-4000-8000-{i:012d}"
                s.add(Sample(id=sid, device_id=("d1", "d2")[i % 2], fleet=fleet,
                             content_sha256=sha, object_key=f"windows/{sha}.npy",
                             dtype="float32", shape=list(w.shape),
                             captured_at=T0 + i * timedelta(seconds=576), model_version="v1",
                             predicted="normal", confidence=0.5, score=0.0))  # fmt: skip
                s.flush()
                s.add(Label(sample_id=sid, label=label, source="device"))
                labels[sid] = label
                i += 1
        s.commit()
    return sessions, s3_store, labels


def _watermark(sessions) -> int:
    with sessions() as s:
        return max(s.scalars(Label.__table__.select().with_only_columns(Label.id)).all())


def test_past_the_cap_a_round_keeps_a_balanced_seeded_sample(uploads, fleet, monkeypatch):
    """73 labelled uploads, a cap of 24: 8 of each class (the smallest class, 8, keeps all
    it has), the same 24 for the same seed and others for another, read in pages of 10
    rows; without a cap all 73 in sample id order, as before."""
    sessions, _, labels = uploads
    monkeypatch.setattr(round_data, "PAGE_ROWS", 10)
    upto = _watermark(sessions)
    everything = labelled_uploads(sessions=sessions, fleet=fleet, upto=upto)
    assert [u.sample_id for u in everything] == sorted(labels)
    assert {u.sample_id: u.label for u in everything} == labels

    capped = labelled_uploads(sessions=sessions, fleet=fleet, upto=upto, cap=24, seed=3)
    assert Counter(u.label for u in capped) == {"normal": 8, "idv_01": 8, "idv_02": 8}
    assert [u.sample_id for u in capped] == sorted(u.sample_id for u in capped)
    assert all(labels[u.sample_id] == u.label for u in capped)
    again = labelled_uploads(sessions=sessions, fleet=fleet, upto=upto, cap=24, seed=3)
    other = labelled_uploads(sessions=sessions, fleet=fleet, upto=upto, cap=24, seed=4)
    assert [u.sample_id for u in again] == [u.sample_id for u in capped]
    assert {u.sample_id for u in other} != {u.sample_id for u in capped}
    # A cap above the count keeps everything.
    assert len(labelled_uploads(sessions=sessions, fleet=fleet, upto=upto, cap=500)) == 73


def test_since_and_the_winning_label_hold_under_the_cap(uploads, fleet):
    """Only uploads whose winning label is newer than ``since`` are new: a sample an
    operator relabelled after it is (with the operator's label); one a teacher labelled
    after it is not, since the device's older label outranks the teacher's."""
    sessions, _, labels = uploads
    since = _watermark(sessions)
    ids = sorted(labels)
    with sessions() as s:
        s.add(Label(sample_id=ids[0], label="idv_07", source="operator"))
        s.add(Label(sample_id=ids[2], label="idv_02", source="teacher"))
        s.commit()
    new = labelled_uploads(
        sessions=sessions, fleet=fleet, upto=_watermark(sessions), since=since, cap=5
    )
    assert [(u.sample_id, u.label, u.source) for u in new] == [(ids[0], "idv_07", "operator")]


def test_a_round_reads_back_at_most_the_cap(uploads, fleet, monkeypatch):
    """Past the cap, what a round reads back from S3 is the cap's worth of windows, not the
    fleet's: 20 window objects read, 20 windows in memory, each the one uploaded."""
    sessions, store, labels = uploads
    counting = CountingStore(store)
    monkeypatch.setattr(round_data, "PAGE_ROWS", 7)
    chosen = labelled_uploads(sessions=sessions, fleet=fleet, upto=_watermark(sessions), cap=20)
    x = load_samples(sessions=sessions, store=counting, ids=[u.sample_id for u in chosen])
    assert len(chosen) == 20 and x.shape[0] == 20
    assert counting.windows_read == 20 < len(labels)
    assert all(content_sha256(w) == u.sha256 for w, u in zip(x, chosen, strict=True))
    assert np.isfinite(x).all()


def test_a_round_over_more_uploads_than_the_cap_trains_on_at_most_the_cap(
    pg_url, s3_store, mlflow_uri, fleet, tep_small
):
    """A real round's train stage over a fleet with 56 labelled uploads of a new fault and
    a cap of 20: it learns from at most 20 of them (fit, validation and held-out together)
    and reads back from S3 at most 20 uploaded windows."""
    from dataclasses import replace

    from cloud.learn import rounds
    from cloud.learn.runner import run_stage
    from cloud.learn.state import RoundConfig, Services
    from cloud.model.configs import TrainConfig

    from .test_learning import seed_fleet

    cfg = RoundConfig(fleet=fleet, train=TrainConfig(epochs=15, lr=2e-3))
    sessions, store, registry, cfg, _ = seed_fleet(pg_url, s3_store, mlflow_uri, fleet,
                                                   tep_small, cfg)  # fmt: skip
    with sessions() as s:
        uploaded = s.query(Sample).count()
    assert uploaded == 56
    counting = CountingStore(store)
    cfg = replace(cfg, max_windows=20, train=TrainConfig(epochs=2, lr=2e-3))
    row = rounds.reserve(sessions=sessions, task_id="t-cap", fleet=fleet, profile=cfg.profile,
                         reason="test", config=cfg.to_dict())  # fmt: skip
    out = run_stage(Services(sessions, counting, registry), row.id, "train")
    learnt = len(out["fit"]) + len(out["validation"]) + len(out["holdout"])
    assert 0 < learnt <= 20 and learnt + out["lineage"]["gap_windows"] <= 20
    assert counting.windows_read <= 20
