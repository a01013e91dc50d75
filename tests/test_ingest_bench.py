"""The ingest bench's read-back accounting: each published window matched once against
rows and stored bytes, so loss, duplicates and damage each move the figure they name."""

from __future__ import annotations

import importlib
import importlib.util
import math

import numpy as np
import pytest

from cloud.store.objects import LocalObjectStore
from cloud.store.windows import content_sha256, npy_bytes

from .conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench" / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PUBLISHED = [("m1", "h1"), ("m2", "h2"), ("m3", "h3")]
ROWS = [("m1", "h1", "o1", 0), ("m2", "h2", "o1", 1), ("m3", "h3", "o2", None)]
WINDOWS = {("o1", 0): "h1", ("o1", 1): "h2", ("o2", None): "h3"}
NO_O2 = {k: v for k, v in WINDOWS.items() if k[0] != "o2"}
CLEAN = {
    "lost": 0,
    "duplicated": 0,
    "corrupt": 0,
    "missing_objects": 0,
    "unexpected_rows": 0,
    "orphan_windows": 0,
}


@pytest.mark.parametrize(
    "rows, windows, moved",
    [
        (ROWS, WINDOWS, {}),
        (ROWS[:2], WINDOWS, {"lost": 1, "orphan_windows": 1}),  # no row
        (ROWS, {**WINDOWS, ("o2", None): None}, {"lost": 1, "corrupt": 1}),  # undecodable
        (
            ROWS,
            NO_O2,
            {"lost": 1, "missing_objects": 1},
        ),
        (ROWS, {**WINDOWS, ("o1", 1): "h9"}, {"lost": 1, "corrupt": 1}),  # other bytes
        (ROWS + [("m4", "h2", "o1", 1)], WINDOWS, {"duplicated": 1, "unexpected_rows": 1}),
        (ROWS, {**WINDOWS, ("o3", 0): "h1"}, {"orphan_windows": 1}),  # stored, never named
        (ROWS, {**WINDOWS, ("o4", None): None}, {"corrupt": 1, "orphan_windows": 1}),
    ],
    ids=["clean", "no-row", "undecodable", "no-object", "wrong-bytes", "twice", "orphan", "junk"],
)
def test_each_failure_moves_its_own_figure(bench, rows, windows, moved):
    """A clean run counts nothing; each kind of failure shows in the figures it names."""
    outcome = bench.reconcile(PUBLISHED, rows, windows)
    assert outcome == {**CLEAN, **moved, "rows": len(rows)}


def test_read_back_hashes_every_stored_window(bench, tmp_path):
    """Batch objects are read slot by slot, single windows whole; a non-.npy object is
    corrupt, not an error."""
    store = LocalObjectStore(tmp_path)
    batch = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    store.put("windows/batches/a.npy", npy_bytes(batch))
    store.put("windows/b.npy", npy_bytes(batch[0] + 1))
    store.put("windows/c.npy", b"not an array")
    store.put("dead-letters/x.bin", b"ignored")

    windows, objects = bench.read_back(store)

    assert objects == 3
    assert windows == {
        ("windows/batches/a.npy", 0): content_sha256(batch[0]),
        ("windows/batches/a.npy", 1): content_sha256(batch[1]),
        ("windows/b.npy", None): content_sha256(batch[0] + 1),
        ("windows/c.npy", None): None,
    }


@pytest.mark.parametrize(
    "latencies, q, expected",
    [
        ([0.3, 0.1, 0.2], 0.5, 0.2),
        ([0.3, 0.1, 0.2], 1.0, 0.3),
        ([0.1] * 99 + [math.inf], 0.99, 0.1),  # the one never stored lies beyond p99
        ([0.1] * 98 + [math.inf] * 2, 0.99, None),  # … unless 2 % were never stored
        ([0.1, math.inf], 1.0, None),
    ],
)
def test_departed_percentiles_count_unstored_as_infinitely_late(latencies, q, expected):
    """A quantile of the departed-sessions latencies that falls on a message never stored
    is None, not the largest latency that was measured."""
    departed = importlib.import_module("bench.ingest_departed")

    assert departed.percentile(latencies, q) == expected
