"""A finite but extreme sensor value (a stuck transmitter reading 1e38, a unit mix-up) is
the sensor's fault, not the model's: the window is clipped to the range the package's
input standardisation knows, scored, flagged out of distribution and uploaded; it never
counts as an inference error and never rolls the model back. The cloud clips the same
way where it evaluates and trains, so both sides score such a window alike."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.store.db import Sample, session_factory
from cloud.store.records import register_device
from cloud.store.windows import load_samples
from edge_agent.runtime import ModelRuntime
from shared.package import ModelPackage, input_range

from .conftest import HOST, make_agent, repackage, wait_for, windows_of

EXTREMES = [1e38, -1e38, 3.0e38, 1e20, -7e12]


@pytest.fixture
def ingest(pg_url, s3_store, fleet, mqtt_port):
    """The cloud's ingest on the shared broker, for device d1: (sessions, store)."""
    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    svc = IngestService(
        Ingestor(sessions=sessions, store=s3_store),
        host=HOST,
        port=mqtt_port,
        fleet=fleet,
        group=f"g{fleet}",
    )
    svc.start()
    assert svc.ready.wait(10)
    yield sessions, s3_store
    svc.stop()


def _extreme(window: np.ndarray, value: float, channel: int = 7) -> np.ndarray:
    out = window.copy()
    out[5:9, channel] = value
    return out


def test_extreme_windows_are_flagged_uploaded_and_never_roll_back(
    tmp_path, fleet, mqtt_port, ingest, tiny_package, tep_small
):
    """On a live agent running v2 (v1 in the spare slot): windows with a finite extreme in
    one channel are scored with finite outputs, flagged ood and uploaded; the cloud's ingest
    stores them, raw, with the reason ood. inference_errors stays 0, nothing is rolled
    back, and the normal windows after them are scored as before."""
    sessions, store = ingest
    _, golden = tep_small
    normal = windows_of(golden, "normal", 8)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0])
    try:
        agent._swap(agent.slots.install(repackage(tiny_package, "v2")))
        before = [agent.process(w)[0] for w in normal]
        sent = {}
        for value in EXTREMES:
            window = _extreme(normal[0], value)
            det, upload = agent.process(window)
            assert det.out_of_range and np.isfinite(det.scores["energy"])
            assert upload is not None and "ood" in upload.reasons
            sent[str(upload.message_id)] = window
        after = [agent.process(w)[0] for w in normal]
        assert agent.inference_errors == 0
        assert agent.model_version == "v2" and agent.update_events == []
        assert [d.predicted for d in after] == [d.predicted for d in before]
        assert not any(d.out_of_range for d in before + after)
        wait_for(lambda: agent.backlog() == 0, 20, agent.tick, "acks")
    finally:
        agent.stop()
    with sessions() as s:
        rows = {r.id: r for r in s.scalars(select(Sample).where(Sample.id.in_(sent)))}
    assert set(rows) == set(sent)
    assert all("ood" in r.reasons for r in rows.values())
    ids = sorted(sent)
    stored = load_samples(sessions=sessions, store=store, ids=ids)
    assert all(np.array_equal(w, sent[i]) for w, i in zip(stored, ids, strict=True))  # raw


def test_clipping_leaves_ordinary_windows_alone_and_bounds_extremes(tiny_package, tep_small):
    """Every golden window, faults included (they reach 160 spreads), lies inside the
    package's input range, so clipping changes no real detection; an extreme value is
    clipped to its channel's edge."""
    _, golden = tep_small
    pkg = ModelPackage(tiny_package[0])
    low, high = input_range(pkg.manifest)
    assert ((golden.x >= low) & (golden.x <= high)).all()
    runtime = ModelRuntime(pkg)
    window = _extreme(golden.x[0], 1e38)
    clipped, flagged = runtime.clip(window[None])
    assert flagged.tolist() == [True]
    assert clipped[0, 5, 7] == high[7] and np.array_equal(clipped[0, :, 8:], window[:, 8:])
    assert runtime.clip(golden.x)[1] is None


@pytest.mark.parametrize("value", EXTREMES)
def test_cloud_scores_an_extreme_window_as_the_device_does(tiny_package, tep_small, value):
    """The torch model (whose standardisation clips: cloud.model.standardise) on the raw
    window and the device's runtime (which clips before the graph) give the same finite
    logits within ONNX's tolerance, and the same prediction."""
    import torch

    pkg_bytes, model = tiny_package
    _, golden = tep_small
    window = _extreme(golden.x[3], value)[None]
    runtime = ModelRuntime(ModelPackage(pkg_bytes))
    device = runtime.logits(runtime.clip(window)[0])
    with torch.no_grad():
        cloud = model.eval()(torch.as_tensor(window)).numpy()
    assert np.isfinite(device).all() and np.isfinite(cloud).all()
    np.testing.assert_allclose(device, cloud, rtol=1e-4, atol=1e-3)
    assert device.argmax() == cloud.argmax()


def _with_metadata(package: bytes, **changes) -> ModelPackage:
    """The package again with its manifest's metadata changed (None drops a key)."""
    from shared.package import build_package

    pkg = ModelPackage(package)
    meta = {k: v for k, v in {**pkg.manifest.metadata, **changes}.items() if v is not None}
    manifest = pkg.manifest.model_copy(update={"metadata": meta})
    return ModelPackage(build_package(graph=pkg.graph, manifest=manifest))


def test_a_package_without_a_range_gets_one_from_its_ood_calibration(tiny_package, tep_small):
    """A package made before input_range (its ood calibration only): the device estimates
    the range from the calibration; every golden window lies inside it and 1e38 does not."""
    _, golden = tep_small
    old = _with_metadata(tiny_package[0], input_range=None)
    low, high = input_range(old.manifest)
    assert ((golden.x >= low) & (golden.x <= high)).all()
    assert (high < 1e38).all() and (low > -1e38).all()
    det = ModelRuntime(old).detect(_extreme(golden.x[0], 1e38)[None])[0]
    assert det.out_of_range and np.isfinite(det.scores["energy"])
    assert input_range(_with_metadata(tiny_package[0], input_range=None, ood=None).manifest) is None


@pytest.mark.parametrize(
    "bad",
    [{"low": [0.0], "high": [1.0]}, {"low": "x"}, {"low": [1.0] * 53, "high": [0.0] * 53}],
)
def test_a_malformed_range_is_a_bad_manifest(tiny_package, bad):
    """A range of the wrong length, unreadable or inverted: the package is refused by name
    when the device loads it."""
    from shared.errors import PackageError

    with pytest.raises(PackageError) as err:
        ModelRuntime(_with_metadata(tiny_package[0], input_range=bad))
    assert err.value.reason == "bad_manifest"
