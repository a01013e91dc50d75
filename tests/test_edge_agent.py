"""The edge agent under failure: broker outages, SIGKILL, power cuts mid-update, bad
updates reported to the cloud, and its scores and brakes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.store.db import DeviceUpdate, Sample, session_factory
from cloud.store.keys import package_key
from cloud.store.records import register_device
from edge_agent.agent import EdgeAgent
from edge_agent.buffer import DurableBuffer
from edge_agent.config import EdgeSettings
from edge_agent.runtime import ModelRuntime
from edge_agent.updater import ModelSlots
from shared.errors import PackageError
from shared.package import ModelPackage
from shared.topics import topic

from .conftest import HOST, ROOT, make_agent, repackage, wait_for, windows_of


@pytest.fixture
def cloud_on(pg_url, s3_store, fleet):
    """Ingest (PostgreSQL + S3) on a given broker port, started on demand."""
    sessions = session_factory(pg_url)
    with sessions() as s:
        register_device(session=s, device_id="d1", fleet=fleet, profile="cpu-fp32")
    running = []

    def start(port):
        svc = IngestService(
            Ingestor(sessions=sessions, store=s3_store),
            host=HOST,
            port=port,
            fleet=fleet,
            group=f"g{fleet}",
        )
        svc.start()
        assert svc.ready.wait(10)
        time.sleep(0.2)
        running.append(svc)
        return svc

    yield sessions, start
    for svc in running:
        svc.stop()


def samples_in(sessions) -> tuple[int, int]:
    """(rows, distinct message ids) of stored samples."""
    with sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(Sample)),
            s.scalar(select(func.count(func.distinct(Sample.id)))),
        )


def test_broker_outage_loses_nothing(
    tmp_path, spare_broker, cloud_on, fleet, tiny_package, tep_small
):
    """Mosquitto goes down mid-stream and comes back: every selected sample is stored
    exactly once."""
    sessions, start_ingest = cloud_on
    start_ingest(spare_broker.port)
    agent = make_agent(tmp_path, fleet, spare_broker.port, tiny_package[0], resend_after_s=1.0)
    _, golden = tep_small
    faulty = np.concatenate([windows_of(golden, c, 10) for c in ("idv_01", "idv_02", "idv_07")])
    try:
        selected = [m for w in faulty[:10] if (m := agent.process(w)[1])]
        wait_for(lambda: agent.backlog() == 0, 20, agent.tick, "first acks")
        spare_broker.stop()
        wait_for(lambda: not agent.link.connected.is_set(), 20, what="link down")
        selected += [m for w in faulty[10:] if (m := agent.process(w)[1])]
        agent.sync()
        assert agent.backlog() == len(selected) - 10 > 0  # held on the device
        spare_broker.start()
        wait_for(lambda: agent.backlog() == 0, 60, agent.tick, "catch-up after outage")
        assert samples_in(sessions) == (len(selected), len(selected))
    finally:
        agent.stop()


def run_agent(args, env, json_logs=False):
    flags = ["-v", "--log-json"] if json_logs else ["-v"]
    return subprocess.Popen(
        [sys.executable, "-c", "from shared.cli import main; main()", *flags, "edge", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_with_unacked_samples_resends_them(
    tmp_path, spare_broker, cloud_on, fleet, tiny_package, tep_small
):
    """An agent killed with SIGKILL while samples wait for acks sends them again after a
    restart; each is stored once. SIGTERM then stops it cleanly."""
    sessions, start_ingest = cloud_on
    _, golden = tep_small
    # The feed as `edgeloop data generate` writes it (compose's sensor feed): x, y, classes.
    feed = tmp_path / "feed.npz"
    x = np.concatenate([windows_of(golden, c, 8) for c in ("idv_01", "idv_07")])
    np.savez(feed, x=x, y=np.zeros(len(x), np.int64), class_names=np.array(["idv_01"]))
    pkg = tmp_path / "v1.edgepkg"
    pkg.write_bytes(tiny_package[0])
    state = tmp_path / "state"
    env = {
        **os.environ,
        "EDGELOOP_EDGE_DIVERSITY_DISTANCE": "0",
        "EDGELOOP_EDGE_RESEND_AFTER_S": "1",
    }
    common = [
        "--fleet",
        fleet,
        "--device-id",
        "d1",
        "--mqtt-port",
        str(spare_broker.port),
        "--state-dir",
        str(state),
    ]
    # No ingest yet: nothing is acked, everything selected piles up in the buffer.
    proc = run_agent([*common, "--package", str(pkg), "--windows", str(feed), "--rate", "200"], env)
    db = state / "buffer.sqlite3"

    def depth():
        try:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    wait_for(lambda: depth() >= 12, 60, what="un-acked samples")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    pending = depth()
    assert pending >= 12 and samples_in(sessions) == (0, 0)
    start_ingest(spare_broker.port)
    proc = run_agent(common, env, json_logs=True)
    try:
        wait_for(lambda: samples_in(sessions)[0] >= pending, 60, what="resent samples")
        wait_for(lambda: depth() == 0, 30, what="acks")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("stopped cleanly" in entry["msg"] for entry in logs), out
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in logs)
    assert samples_in(sessions) == (pending, pending)


CRASHER = """
import os, sys
from pathlib import Path
from edge_agent import updater
limit = int(sys.argv[2])
calls = 0
def step(fn):
    def wrapped(*a, **k):
        global calls
        calls += 1
        if calls > limit:
            os._exit(9)  # the power goes: no cleanup, no finally
        return fn(*a, **k)
    return wrapped
updater.os.replace = step(updater.os.replace)
updater.os.fsync = step(updater.os.fsync)
updater.ModelSlots(Path(sys.argv[1]), profile="cpu-fp32").install(Path(sys.argv[3]).read_bytes())
print("completed")
"""


def test_power_cut_between_any_two_update_steps(tmp_path, tiny_package):
    """For every step of an install (each fsync and rename), a process killed right there
    restarts on a valid model, v1 or v2, never a broken one; after the last step it is v2."""
    pkg, _ = tiny_package
    v2 = tmp_path / "v2.edgepkg"
    v2.write_bytes(repackage(tiny_package, "v2"))
    step, outcomes = 0, []
    while True:
        slots_dir = tmp_path / f"slots-{step}"
        ModelSlots(slots_dir, profile="cpu-fp32").install(pkg)
        run = subprocess.run(
            [sys.executable, "-c", CRASHER, str(slots_dir), str(step), str(v2)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        runtime = ModelSlots(slots_dir, profile="cpu-fp32").load_active()
        assert runtime is not None, f"no valid model after a cut at step {step}"
        runtime.smoke_check()
        outcomes.append(runtime.version)
        if run.returncode == 0:
            assert "completed" in run.stdout
            break
        assert run.returncode == 9, run.stderr
        step += 1
    print("versions after a cut at each step:", outcomes)
    assert step >= 6  # slot write, its fsyncs and rename, then the pointer's
    assert outcomes[0] == "v1" and outcomes[-1] == "v2"
    assert set(outcomes) == {"v1", "v2"}
    flip = outcomes.index("v2")
    assert all(v == "v2" for v in outcomes[flip:])  # once the pointer flipped, it stays


def test_refused_updates_are_reported_to_the_cloud(
    tmp_path, mqtt_port, cloud_on, s3_store, fleet, tiny_package
):
    """Signed releases the device must refuse (a package for another profile, bytes in the
    store that are not the signed ones) reach the cloud's update table with their reasons
    while v1 keeps serving; then a good release installs and is recorded installed."""
    from .test_transfer import FleetRepo, start_transport

    sessions, start_ingest = cloud_on
    start_ingest(mqtt_port)
    repo = FleetRepo(s3_store, fleet, tmp_path / "keys")
    transport = start_transport(mqtt_port, s3_store, fleet)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], resend_after_s=1.0)
    agent.enroll(repo.root)

    def offer(release, path, data, events):
        repo.offer(transport, release, path, data)
        wait_for(lambda: len(agent.update_events) == events, 30, what=f"report {events}")

    try:
        offer(*repo.release(repackage(tiny_package, "v2-mcu", profile="mcu-int4")), 1)
        release, path, v2 = repo.release(repackage(tiny_package, "v2"))
        tampered = bytearray(v2)
        tampered[len(v2) // 2] ^= 0xFF
        s3_store.put(package_key(fleet, "cpu-fp32", "v2"), bytes(tampered))
        offer(release, path, v2, 2)
        assert agent.model_version == "v1"
        offer(*repo.release(repackage(tiny_package, "v3")), 3)
        assert agent.model_version == "v3"
        wait_for(lambda: agent.backlog() == 0, 20, agent.tick, "status acks")
        with sessions() as s:
            rows = {r.target_version: (r.state, r.reason) for r in s.scalars(select(DeviceUpdate))}
        assert rows == {
            "v2-mcu": ("rejected", "mix_and_match"),
            "v2": ("rejected", "bad_hash"),
            "v3": ("installed", None),
        }
    finally:
        agent.stop()
        transport.stop()


def test_truncated_package_with_its_own_hash_is_corrupt(tmp_path, tiny_package):
    """A truncated package announced with its own (matching) hash is refused as corrupt."""
    slots = ModelSlots(tmp_path, profile="cpu-fp32")
    slots.install(tiny_package[0])
    cut = tiny_package[0][:-300]
    with pytest.raises(PackageError) as err:
        slots.install(cut, expected_sha256=hashlib.sha256(cut).hexdigest())
    assert err.value.reason == "corrupt_package"
    assert slots.load_active().version == "v1"


def test_scores_flag_a_fault_the_model_never_saw(tiny_package, tep_small):
    """Energy, max-softmax and feature distance are all reported; the feature distance
    flags most windows of an unseen fault (idv_06) and few normal ones."""
    from sim.tep import generate

    from .conftest import TEP_CACHE

    runtime = ModelRuntime(ModelPackage(tiny_package[0]))
    _, golden = tep_small
    unseen = generate(
        classes=["idv_06"], runs_per_class=1, seed=5, horizon_h=4.0, cache_dir=TEP_CACHE
    ).x
    normal = windows_of(golden, "normal", 100)
    det_unseen, det_normal = runtime.detect(unseen), runtime.detect(normal)
    assert set(det_unseen[0].scores) == {"energy", "max_softmax", "distance"}
    flagged = np.mean([d.scores["distance"] > 1 for d in det_unseen])
    false_alarms = np.mean([d.scores["distance"] > 1 for d in det_normal])
    print(f"distance flags {flagged:.0%} of idv_06, {false_alarms:.0%} of normal")
    assert flagged >= 0.9 and false_alarms <= 0.1


def test_brakes_and_eviction_are_counted(tmp_path, tiny_package, tep_small):
    """Near-duplicates and over-budget candidates are skipped and counted; a full buffer
    evicts its oldest messages and counts them; heartbeats carry the counts."""
    _, golden = tep_small
    window = windows_of(golden, "idv_01", 1)[0]
    agent = EdgeAgent(
        EdgeSettings(
            fleet="f",
            device_id="d1",
            mqtt_port=9,
            state_dir=tmp_path / "a",
            diversity_distance=0.5,
            buffer_max_messages=10,
            upload_bytes_per_hour=6 * (window.nbytes * 4 // 3 + 600),
        )
    )
    agent.bootstrap(tiny_package[0])
    for _ in range(3):  # the same window three times: two are near-duplicates
        agent.process(window)
    assert agent.selector.skipped_duplicate == 2
    agent.selector.diversity_distance = 0.0
    for w in windows_of(golden, "idv_07", 10):
        agent.process(w)
    assert agent.selector.skipped_budget == 5  # 6 fit the hourly budget, 1 was used above
    agent.sync()
    for i in range(15):
        agent.buffer.put(f"filler-{i}", "t", b"x")
    hb = agent.heartbeat()
    assert agent.buffer.depth() == 10
    assert hb.buffer_evicted == agent.buffer.stats()["evicted"] == 6 + 15 - 10
    assert (hb.skipped_duplicate, hb.skipped_budget) == (2, 5)
    agent.stop()


def test_buffer_survives_reopen(tmp_path):
    """What was put is still there after the buffer is closed and opened again."""
    buf = DurableBuffer(tmp_path / "b.sqlite3")
    buf.put("m1", "t", b"payload")
    buf.close()
    again = DurableBuffer(tmp_path / "b.sqlite3")
    assert [p.message_id for p in again.pending()] == ["m1"]
    assert again.ack(["m1"]) == 1 and again.depth() == 0


def test_last_will_marks_a_vanished_device_offline(
    tmp_path, mqtt_port, cloud_on, fleet, tiny_package
):
    """A device whose connection drops without a goodbye is marked offline by its Last Will;
    its heartbeats carry model version, latency, buffer depth and anomaly rate."""
    import socket as socketlib

    from cloud.store.db import Device

    sessions, start_ingest = cloud_on
    start_ingest(mqtt_port)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], resend_after_s=1.0)
    try:
        agent.process(np.zeros((32, 53), dtype=np.float32))
        agent.heartbeat()

        def device():
            with sessions() as s:
                return s.get(Device, "d1")

        wait_for(lambda: device().online and device().model_version == "v1", 10, what="online")
        health = device().health
        assert {"buffer_depth", "windows_seen", "anomaly_rate", "latency_ms_p50"} <= set(health)
        assert health["windows_seen"] == 1 and health["latency_ms_p50"] > 0
        agent.link.client.socket().shutdown(socketlib.SHUT_RDWR)  # the line goes dead
        wait_for(lambda: not device().online, 20, what="Last Will")
    finally:
        agent.stop()


def test_bad_sensor_data_is_refused_without_touching_the_model(tmp_path, tiny_package):
    """A window with NaN or infinity is refused as bad data; the model is not blamed, not
    rolled back, and the next good window is scored as usual."""
    from shared.errors import DataError

    agent = EdgeAgent(
        EdgeSettings(fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path / "a")
    )
    agent.bootstrap(tiny_package[0])
    agent.slots.install(repackage(tiny_package, "v2"))
    agent.runtime = agent.slots.load_active()
    window = np.zeros((32, 53), dtype=np.float32)
    for bad in (np.nan, np.inf):
        window[5, 7] = bad
        with pytest.raises(DataError) as err:
            agent.process(window)
        assert err.value.reason == "non_finite"
    assert agent.model_version == "v2" and agent.update_events == []
    window[5, 7] = 0.0
    det, _ = agent.process(window)
    assert det.predicted in ModelPackage(tiny_package[0]).manifest.class_names
    agent.stop()


def test_selected_windows_are_buffered_as_the_cloud_decodes_them(tmp_path, tiny_package, tep_small):
    """Every window process() selects is in the buffer after sync(), under its upload's id,
    as a sample the cloud's decoder accepts, with the window bit for bit even though the
    caller reuses its array; windows not selected leave nothing behind."""
    from shared.messages import decode

    _, golden = tep_small
    windows = np.concatenate([windows_of(golden, c, 20) for c in ("idv_01", "idv_07", "normal")])
    agent = EdgeAgent(
        EdgeSettings(
            fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path / "a", diversity_distance=0
        )
    )
    agent.bootstrap(tiny_package[0])
    reused = np.empty_like(windows[0])
    uploads = {}
    try:
        for w in windows:
            reused[:] = w  # a sensor source that fills the same buffer each time
            det, up = agent.process(reused)
            if up is not None:
                uploads[str(up.message_id)] = (w, det, up)
        agent.sync()
        pending = {p.message_id: p for p in agent.buffer.pending(limit=1000)}
        assert len(uploads) >= 20 and set(pending) == set(uploads)
        for message_id, (w, det, up) in uploads.items():
            msg = decode("samples", pending[message_id].payload)
            assert msg.window.to_array().tobytes() == w.tobytes()
            assert (msg.message_id, msg.predicted, msg.reasons) == (
                up.message_id,
                det.predicted,
                up.reasons,
            )
            assert msg.message_id.version == 7  # time-ordered: the buffer's index appends
            assert pending[message_id].topic == topic("f", "d1", "samples")
    finally:
        agent.stop()


def test_any_layout_of_a_selected_window_is_buffered_as_float32(tmp_path, tiny_package, tep_small):
    """A float64 or Fortran-ordered window the agent selects is buffered as its float32
    copy in C order, the bytes the cloud decodes."""
    from shared.messages import decode

    _, golden = tep_small
    agent = EdgeAgent(
        EdgeSettings(
            fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path / "a", diversity_distance=0
        )
    )
    agent.bootstrap(tiny_package[0])
    sent = {}
    try:
        for w in windows_of(golden, "idv_01", 10):
            for variant in (w.astype(np.float64), np.asfortranarray(w)):
                _, up = agent.process(variant)
                if up is not None:
                    sent[str(up.message_id)] = w.astype(np.float32)
        agent.sync()
        pending = {p.message_id: p for p in agent.buffer.pending(limit=1000)}
        assert sent and set(pending) == set(sent)
        for message_id, w in sent.items():
            got = decode("samples", pending[message_id].payload).window.to_array()
            assert got.tobytes() == np.ascontiguousarray(w).tobytes()
    finally:
        agent.stop()
