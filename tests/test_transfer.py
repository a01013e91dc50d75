"""Signed updates over MQTT chunks: the device's resumable download, the cloud's rollout
transport, and the install off paho's network thread."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest

from cloud.rollout.signing import Assignment, ReleaseSigner, init_fleet_trust
from cloud.rollout.transport import RolloutTransport
from cloud.store.keys import package_key
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from edge_agent.transfer import Download, TransferCancelled
from shared.errors import PackageError
from shared.messages import Ack, UpdateChunk, UpdateOffer
from shared.package import ModelPackage
from shared.topics import topic
from shared.trust import UpdateRefused

from .conftest import HOST, make_agent, repackage, wait_for, windows_of
from .fleetkit import package_variant

CHUNK = 4096  # small chunks: a package of ~100 KiB is a few dozen of them


class FleetRepo:
    """A fleet's TUF repository and package store, as the rollout worker holds them."""

    def __init__(self, store, fleet: str, keys: Path) -> None:
        self.store, self.fleet = store, fleet
        self.root = init_fleet_trust(
            store=store, fleet=fleet, keys_dir=keys / "online", offline_dir=keys / "offline"
        )
        self.signer = ReleaseSigner(store=store, fleet=fleet, keys_dir=keys / "online")

    def release(self, package: bytes, devices=("d1",)) -> tuple[int, str, bytes]:
        """Store ``package`` and sign a release assigning it to ``devices``: (release,
        target path, its bytes)."""
        m = ModelPackage(package).manifest
        self.store.put(package_key(self.fleet, m.profile, m.version), package)
        path = f"{m.profile}/{m.version}.edgepkg"
        release = self.signer.publish(
            [
                Assignment(
                    path=path,
                    sha256=hashlib.sha256(package).hexdigest(),
                    length=len(package),
                    fleet=self.fleet,
                    profile=m.profile,
                    version=m.version,
                    devices=tuple(devices),
                )
            ]
        )
        return release, path, package

    def offer(self, transport, release: int, path: str, package: bytes, device="d1") -> None:
        transport.offer(
            fleet=self.fleet,
            device_id=device,
            release=release,
            target_path=path,
            length=len(package),
            bundle=self.signer.bundle(),
        )


def start_transport(port, store, fleet, cls=RolloutTransport, **kw) -> RolloutTransport:
    # A shared group of the test's own: transports of other tests must not take its requests.
    transport = cls(
        host=HOST, port=port, store=store, chunk_size=CHUNK, shared_group=f"r{fleet}", **kw
    )
    transport.start()
    assert transport.ready.wait(10)
    return transport


def enrolled_agent(tmp_path, fleet, port, package, repo, **kw):
    agent = make_agent(tmp_path, fleet, port, package, transfer_retry_s=1.0, **kw)
    agent.enroll(repo.root)
    return agent


def requested(transport, device="d1") -> list[int]:
    """Every chunk index the transport was asked for, in order, repeats included."""
    return [
        i
        for r in list(transport.served)
        if r.device_id == device
        for i in range(r.first, r.first + r.count)
    ]


@pytest.fixture
def repo(s3_store, fleet, tmp_path):
    return FleetRepo(s3_store, fleet, tmp_path / "keys")


def test_signed_offer_installs_over_mqtt_chunks(
    tmp_path, repo, fleet, mqtt_port, tiny_package, tep_small
):
    """An enrolled agent offered a signed release by the rollout transport downloads the
    target in chunks from S3, installs it (the signed sha256), reports applied with the
    release, heartbeats it, and leaves no partial download behind."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    try:
        for w in windows_of(tep_small[1], "idv_01", 5):
            agent.process(w)
        assert agent.heartbeat().recent_windows == 5
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live")
        wait_for(lambda: agent.update_events, 10, what="the report")
        report = agent.update_events[-1]
        assert (report.target_version, report.status, report.release) == ("v2", "applied", release)
        assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
        assert sorted(set(requested(transport))) == list(range(-(-len(v2) // CHUNK)))
        hb = agent.heartbeat()
        assert (hb.release, hb.model_version, hb.capabilities) == (
            release,
            "v2",
            ("tuf", "package", "delta"),
        )
        assert hb.agent_version and hb.memory_mb > 0 and hb.latency_ms_p99 >= hb.latency_ms_p50
        assert hb.recent_windows == 0  # the anomaly rate restarts with the new model
        assert list((tmp_path / "d1" / "downloads").iterdir()) == []
    finally:
        agent.stop()
        transport.stop()


def test_going_back_to_the_model_in_the_spare_slot_needs_no_download(
    tmp_path, repo, fleet, mqtt_port, tiny_package
):
    """A release that assigns the device the model it ran before (a canary rolled back,
    or champion moved back) makes the spare slot live again: its bytes are the signed
    sha256, so not one chunk is asked for; a model it never held is downloaded."""
    v1 = tiny_package[0]
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, v1, repo)
    try:
        release, path, v2 = repo.release(repackage(tiny_package, "v2"))
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live")
        asked_for_v2 = len(transport.served)
        back, path1, _ = repo.release(v1)
        repo.offer(transport, back, path1, v1)
        wait_for(lambda: agent.model_version == "v1", 30, what="v1 live again")
        report = agent.update_events[-1]
    finally:
        agent.stop()
        transport.stop()

    assert asked_for_v2 > 0
    assert [r.target for r in transport.served] == [path] * asked_for_v2  # none for v1
    assert (report.target_version, report.status, report.release) == ("v1", "applied", back)
    assert (report.payload, report.received_bytes) == ("spare", 0)
    assert agent.runtime.package.sha256 == hashlib.sha256(v1).hexdigest()


class CuttingTransport(RolloutTransport):
    """Signals when it serves chunk ``cut_at`` the first time (the test then stops the
    broker), and corrupts chunk ``corrupt_at`` the first time it is served."""

    def __init__(self, *, cut_at: int = -1, corrupt_at: int = -1, **kw) -> None:
        super().__init__(**kw)
        self.cut_at, self.corrupt_at = cut_at, corrupt_at
        self.cut = threading.Event()
        self.corrupted = 0

    def chunk_message(self, fleet, device_id, target, index, data) -> UpdateChunk:
        msg = super().chunk_message(fleet, device_id, target, index, data)
        if index == self.cut_at and not self.cut.is_set():
            self.cut.set()
            time.sleep(0.5)  # the broker goes down under this request
        if index == self.corrupt_at and not self.corrupted:
            self.corrupted += 1
            flipped = bytes([data[0] ^ 0xFF]) + data[1:]
            return (
                super()
                .chunk_message(fleet, device_id, target, index, flipped)
                .model_copy(
                    update={"sha256": msg.sha256}  # the hash of what should have come
                )
            )
        return msg


def test_disconnected_device_resumes_from_its_first_missing_chunk(
    tmp_path, spare_broker, repo, fleet, tiny_package
):
    """The broker dies (its sessions and queued chunks with it) after some chunks arrived;
    once it is back the device asks again from its first missing chunk, never for one it
    holds, and installs the signed target."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(spare_broker.port, repo.store, fleet, CuttingTransport, cut_at=12)
    agent = enrolled_agent(
        tmp_path, fleet, spare_broker.port, tiny_package[0], repo, transfer_window=4
    )
    try:
        repo.offer(transport, release, path, v2)
        assert transport.cut.wait(30)
        spare_broker.stop()
        wait_for(lambda: not agent.link.connected.is_set(), 10, what="link down")
        download = agent.updates.transfers.current
        held = set(download.held)
        k = download.first_missing()
        assert 0 < k < download.n_chunks
        before = len(transport.served)
        spare_broker.start()
        wait_for(lambda: agent.model_version == "v2", 60, what="v2 live after the outage")
        after = list(transport.served)[before:]
        assert after, "the device asked again after the outage"
        assert all(i not in held for r in after for i in range(r.first, r.first + r.count))
        assert min(r.first for r in after) >= k
        assert requested(transport).count(0) == 1  # never from zero
        assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
    finally:
        agent.stop()
        transport.stop()


def test_restarted_agent_resumes_its_download(tmp_path, repo, fleet, mqtt_port, tiny_package):
    """An agent stopped mid-download keeps what it held; restarted and offered the release
    again, it asks only for the chunks it lacks."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet, CuttingTransport, cut_at=10)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo, transfer_window=4)
    try:
        repo.offer(transport, release, path, v2)
        assert transport.cut.wait(30)
        download = agent.updates.transfers.current
        agent.stop()  # the updater stops mid-download; what it holds stays on disk
        held = set(download.held)
        assert held and len(held) < download.n_chunks
        before = len(transport.served)
        agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
        assert agent.model_version == "v1"
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live after the restart")
        after = [
            i for r in list(transport.served)[before:] for i in range(r.first, r.first + r.count)
        ]
        assert after and not held & set(after)
    finally:
        agent.stop()
        transport.stop()


def test_corrupted_chunk_is_refused_and_asked_again(tmp_path, repo, fleet, mqtt_port, tiny_package):
    """A chunk whose bytes do not match its hash is dropped and asked for again; the
    target still installs bit for bit."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet, CuttingTransport, corrupt_at=3)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    try:
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live")
        assert transport.corrupted == 1
        assert requested(transport).count(3) == 2  # the corrupt copy, then the good one
        assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
    finally:
        agent.stop()
        transport.stop()


def test_failed_smoke_check_is_reported_and_the_old_model_serves(
    tmp_path, repo, fleet, mqtt_port, tiny_package, tep_small
):
    """A signed package whose model gives NaN fails its smoke check on the device: reported
    failed (smoke_check_failed) with the release, and v1 keeps scoring windows."""
    release, path, bad = repo.release(package_variant(tiny_package, "v2-nan", nan=True))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    try:
        repo.offer(transport, release, path, bad)
        wait_for(lambda: agent.update_events, 30, what="the report")
        report = agent.update_events[-1]
        assert (report.target_version, report.status, report.reason, report.release) == (
            "v2-nan",
            "failed",
            "smoke_check_failed",
            release,
        )
        assert agent.model_version == report.running_version == "v1"
        _, golden = tep_small
        det, _ = agent.process(windows_of(golden, "idv_01", 1)[0])
        assert det.predicted in ModelPackage(tiny_package[0]).manifest.class_names
    finally:
        agent.stop()
        transport.stop()


def test_install_runs_off_the_network_thread(
    tmp_path, repo, fleet, mqtt_port, tiny_package, tep_small
):
    """While a package is being installed (held in the middle), the agent's network thread
    still takes acks: the install runs on the updater thread."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    real_install, gate, seen = agent.slots.install, threading.Event(), {}

    def held_install(data, **kw):
        seen["thread"] = threading.current_thread().name
        gate.wait(30)
        return real_install(data, **kw)

    agent.slots.install = held_install
    cloud = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    cloud.connect(HOST, mqtt_port)
    cloud.loop_start()
    try:
        _, golden = tep_small
        _, upload = agent.process(windows_of(golden, "idv_01", 1)[0])
        assert upload is not None
        agent.sync()
        repo.offer(transport, release, path, v2)
        wait_for(lambda: "thread" in seen, 30, what="the install to start")
        ack = Ack(fleet=fleet, device_id="d1", acked_ids=(upload.message_id,), status="stored")
        cloud.publish(topic(fleet, "d1", "acks"), ack.encode(), qos=1)
        wait_for(lambda: agent.buffer.depth() == 0, 10, what="the ack, mid-install")
        assert agent.model_version == "v1"
        gate.set()
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 live")
        assert seen["thread"] == "edge-updater"
    finally:
        gate.set()
        cloud.loop_stop()
        agent.stop()
        transport.stop()


def test_unenrolled_agent_refuses_offers(tmp_path, tiny_package, caplog):
    """An agent with no fleet root refuses an offer as missing_metadata and says how to
    enroll it in its log."""
    agent = EdgeAgent(EdgeSettings(fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path))
    agent.bootstrap(tiny_package[0])
    offer = UpdateOffer(
        fleet="f",
        device_id="d1",
        release=3,
        target="cpu-fp32/v2.edgepkg",
        length=1000,
        chunk_size=CHUNK,
        metadata={},
    )
    with caplog.at_level(logging.ERROR, logger="edge_agent.updates"):
        report = agent.updates.handle(offer)
    assert (report.target_version, report.status, report.reason) == (
        "v2",
        "rejected",
        "missing_metadata",
    )
    assert "edgeloop edge enroll" in caplog.text
    assert agent.model_version == "v1"
    agent.stop()


# -- the download alone, with a plain callable for the cloud ------------------------------


def feeder(data: bytes, downloads: list, log: list, *, stop_after: int | None = None):
    """A request callable that answers at once from ``data`` (the cloud), recording each
    (first, count); after ``stop_after`` chunks it stops answering (the link is gone)."""
    sent = [0]

    def request(first: int, count: int) -> bool:
        log.append((first, count))
        for i in range(first, min(first + count, -(-len(data) // CHUNK))):
            if stop_after is not None and sent[0] >= stop_after:
                return True
            piece = data[i * CHUNK : (i + 1) * CHUNK]
            downloads[0].deliver(
                UpdateChunk(
                    fleet="f",
                    device_id="d1",
                    target="p/v2.edgepkg",
                    index=i,
                    sha256=hashlib.sha256(piece).hexdigest(),
                    data=base64.b64encode(piece).decode(),
                )
            )
            sent[0] += 1
        return True

    return request


def new_download(directory, data, request, **kw) -> Download:
    return Download(
        directory=directory,
        target="p/v2.edgepkg",
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        chunk_size=CHUNK,
        request=request,
        **{"window": 4, "retry_s": 0.3, "stall_s": 1.0, **kw},
    )


def test_download_survives_a_restart_and_stalls_with_a_reason(tmp_path, tiny_package):
    """A download that stops getting chunks fails as transfer_failed; a new one over the
    same directory (a restarted agent) holds what the first stored, asks from its first
    missing chunk, and yields the target bit for bit."""
    data = repackage(tiny_package, "v2")
    downloads: list = [None]
    first_log: list = []
    downloads[0] = new_download(tmp_path, data, feeder(data, downloads, first_log, stop_after=9))
    got = bytearray()
    with pytest.raises(UpdateRefused) as err:
        for piece in downloads[0].chunks():
            got += piece
    assert err.value.reason == "transfer_failed"
    assert bytes(got) == data[: 9 * CHUNK]
    second_log: list = []
    downloads[0] = new_download(tmp_path, data, feeder(data, downloads, second_log))
    assert set(downloads[0].held) == set(range(9))
    assert b"".join(downloads[0].chunks()) == data
    assert second_log[0][0] == 9 and all(first >= 9 for first, _ in second_log)


def test_held_chunk_whose_bytes_changed_is_fetched_again(tmp_path, tiny_package):
    """A chunk the record says is held but whose bytes on disk no longer match (a power
    cut between the data and the record) is asked for again; a cancelled download stops."""
    data = repackage(tiny_package, "v2")
    downloads: list = [None]
    downloads[0] = new_download(tmp_path, data, feeder(data, downloads, [], stop_after=6))
    with pytest.raises(UpdateRefused):
        b"".join(downloads[0].chunks())
    with open(downloads[0].part, "r+b") as fh:
        fh.seek(2 * CHUNK)
        fh.write(b"\0" * 16)
    again_log: list = []
    downloads[0] = new_download(tmp_path, data, feeder(data, downloads, again_log))
    assert set(downloads[0].held) == {0, 1, 3, 4, 5}
    downloads[0].cancel()
    with pytest.raises(TransferCancelled):
        b"".join(downloads[0].chunks())
    downloads[0] = new_download(tmp_path, data, feeder(data, downloads, again_log))
    assert b"".join(downloads[0].chunks()) == data
    assert downloads[0].part.read_bytes() == data


def test_enroll_command_gives_the_agent_its_fleet_root(tmp_path, fleet):
    """`edgeloop edge enroll --root FILE` stores the fleet's root where the agent reads it;
    a file that is not a valid root is refused with exit status 2."""
    import subprocess
    import sys

    from cloud.store.objects import LocalObjectStore

    repo = FleetRepo(LocalObjectStore(tmp_path / "objects"), fleet, tmp_path / "keys")
    root = tmp_path / "root.json"
    root.write_bytes(repo.root)
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"signed": {}}')

    def enroll(path):
        return subprocess.run(
            [sys.executable, "-c", "from shared.cli import main; main()", "edge", "enroll"]
            + ["--root", str(path), "--state-dir", str(tmp_path / "state")],
            capture_output=True,
            text=True,
        )

    refused = enroll(bogus)
    done = enroll(root)
    assert refused.returncode == 2, refused.stderr
    assert done.returncode == 0, done.stderr
    agent = EdgeAgent(
        EdgeSettings(fleet=fleet, device_id="d1", mqtt_port=9, state_dir=tmp_path / "state")
    )
    assert agent.updates.trust.enrolled()
    assert agent.heartbeat().release is None  # no release verified yet
    agent.stop()


def test_transport_survives_bad_requests(tmp_path, s3_store, fleet, mqtt_port, tiny_package):
    """Garbage, a request naming another device and requests for targets the store lacks
    are counted and logged; the transport stays alive and serves the next good request."""
    from shared.messages import ChunkRequest, decode

    pkg = tiny_package[0]
    s3_store.put(package_key(fleet, "cpu-fp32", "v1"), pkg)
    transport = start_transport(mqtt_port, s3_store, fleet)
    got: list = []
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    device.on_message = lambda c, u, m: got.append(decode("updates", m.payload))
    device.connect(HOST, mqtt_port)
    device.subscribe(topic(fleet, "d1", "updates"), qos=1)
    device.loop_start()

    def ask(target, device_id="d1", first=0, count=2):
        req = ChunkRequest(
            fleet=fleet, device_id=device_id, target=target, release=1, first=first, count=count
        )
        device.publish(topic(fleet, "d1", "update-status"), req.encode(), qos=1)

    try:
        time.sleep(0.3)  # the SUBACK
        device.publish(topic(fleet, "d1", "update-status"), b"{not json", qos=1)
        ask("cpu-fp32/v1.edgepkg", device_id="d2")
        ask("cpu-fp32/v9.edgepkg")
        ask("../../etc/passwd")
        wait_for(lambda: transport.bad_requests == 4, 10, what="four refusals")
        ask("cpu-fp32/v1.edgepkg", first=1, count=2)
        wait_for(lambda: len(got) == 2, 10, what="two chunks")
        assert [c.index for c in got] == [1, 2]
        assert base64.b64decode(got[0].data) == pkg[CHUNK : 2 * CHUNK]
        assert transport.alive() and transport.bad_requests == 4
    finally:
        device.loop_stop()
        transport.stop()


def test_a_newer_offer_supersedes_a_waiting_one():
    """The updater's mailbox keeps the newest release: an older offer arriving later is
    dropped, a newer one replaces the one waiting."""
    from edge_agent.updates import LatestOffer

    def offer(release):
        return UpdateOffer(
            fleet="f",
            device_id="d1",
            release=release,
            target="p/v.edgepkg",
            length=1,
            chunk_size=CHUNK,
            metadata={},
        )

    box = LatestOffer()
    assert box.put(offer(3)) and not box.put(offer(2)) and box.put(offer(4))
    assert box.take(0.1).release == 4 and box.take(0.01) is None


def test_presigned_url_is_fetched_and_mqtt_fills_in(tmp_path, repo, fleet, mqtt_port, tiny_package):
    """A device that can reach object storage fetches the target from the offer's presigned
    S3 URL and asks for no chunk; one whose URL does not answer gets every chunk over MQTT.
    Both install the signed target."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"), devices=("d1", "d2"))
    transport = start_transport(mqtt_port, repo.store, fleet)
    urls = {"d1": transport.target_url(fleet, path), "d2": "http://127.0.0.1:9/gone"}
    assert urls["d1"] and urls["d1"].startswith("http://")
    hosts = f"{urlsplit(urls['d1']).netloc},127.0.0.1:9"
    agents = [
        enrolled_agent(
            tmp_path,
            fleet,
            mqtt_port,
            tiny_package[0],
            repo,
            device=d,
            fetch_urls=True,
            fetch_url_hosts=hosts,
        )
        for d in ("d1", "d2")
    ]
    try:
        for device, url in urls.items():
            transport.offer(
                fleet=fleet,
                device_id=device,
                release=release,
                target_path=path,
                length=len(v2),
                bundle=repo.signer.bundle(),
                url=url,
            )
        for agent in agents:
            wait_for(lambda a=agent: a.model_version == "v2", 30, what="v2 live")
            assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
        assert requested(transport, "d1") == []
        assert sorted(set(requested(transport, "d2"))) == list(range(-(-len(v2) // CHUNK)))
    finally:
        for agent in agents:
            agent.stop()
        transport.stop()


def nan_on_live_data(tiny_package, version: str) -> bytes:
    """The fixture's model as ``version``, its energy output made NaN for any window but
    an all-zero one: it passes the smoke check and fails on the first real window."""
    import onnx
    from onnx import helper

    from shared.package import Manifest, build_package, sha256_hex

    pkg = ModelPackage(repackage(tiny_package, version))
    model = onnx.load_from_string(pkg.graph)
    graph = model.graph
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == "energy":
                    names[i] = "energy_raw"
    window = graph.input[0].name
    graph.node.extend(
        [
            helper.make_node("ReduceSumSquare", [window], ["sum_sq"], keepdims=0),
            helper.make_node("Neg", ["sum_sq"], ["minus_sum_sq"]),
            helper.make_node("Sqrt", ["minus_sum_sq"], ["nan_unless_zero"]),  # sqrt(-s): NaN
            helper.make_node("Add", ["energy_raw", "nan_unless_zero"], ["energy"]),
        ]
    )
    raw = model.SerializeToString()
    manifest = Manifest.model_validate(
        {**pkg.manifest.model_dump(mode="json"), "graph_sha256": sha256_hex(raw)}
    )
    return build_package(graph=raw, manifest=manifest)


def test_model_failing_on_live_windows_rolls_back(tmp_path, tiny_package, tep_small):
    """A model that passed its smoke check but fails on a real window is rolled back at
    once: reported rolled_back (inference_error), counted in the heartbeat, and the
    previous model scores the next window."""
    agent = EdgeAgent(EdgeSettings(fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path))
    agent.bootstrap(tiny_package[0])
    agent._swap(agent.slots.install(nan_on_live_data(tiny_package, "v2-bad")))
    window = windows_of(tep_small[1], "idv_01", 1)[0]
    try:
        assert agent.model_version == "v2-bad"
        with pytest.raises(PackageError):
            agent.process(window)
        report = agent.update_events[-1]
        assert (report.target_version, report.status, report.reason) == (
            "v2-bad",
            "rolled_back",
            "inference_error",
        )
        assert agent.model_version == report.running_version == "v1"
        assert agent.heartbeat().inference_errors == 1
        det, _ = agent.process(window)
        assert det.predicted in ModelPackage(tiny_package[0]).manifest.class_names
    finally:
        agent.stop()


def test_target_longer_than_signed_is_refused_as_endless_data(
    tmp_path, repo, fleet, mqtt_port, tiny_package
):
    """Bytes in the store that run on past the signed length are refused as endless_data
    after at most one chunk past it; v1 keeps serving."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    endless = v2 + bytes(40 * CHUNK)
    repo.store.put(package_key(fleet, "cpu-fp32", "v2"), endless)
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    try:
        repo.offer(transport, release, path, endless)
        wait_for(lambda: agent.update_events, 30, what="the refusal")
        report = agent.update_events[-1]
        assert (report.status, report.reason) == ("rejected", "endless_data")
        assert max(requested(transport)) <= len(v2) // CHUNK + 1
        assert agent.model_version == "v1"
    finally:
        agent.stop()
        transport.stop()


def test_newer_release_cancels_a_running_download(tmp_path, repo, fleet, mqtt_port, tiny_package):
    """A release offered while the previous one's target is downloading supersedes it: the
    device drops that download without a report and installs the newer target."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet, CuttingTransport, cut_at=5)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    try:
        repo.offer(transport, release, path, v2)
        assert transport.cut.wait(30)
        newer, path3, v3 = repo.release(repackage(tiny_package, "v3"))
        repo.offer(transport, newer, path3, v3)
        wait_for(lambda: agent.model_version == "v3", 30, what="v3 live")
        assert [(e.target_version, e.status, e.release) for e in agent.update_events] == [
            ("v3", "applied", newer)
        ]
    finally:
        agent.stop()
        transport.stop()


def test_offline_time_does_not_fail_a_download(tmp_path, tiny_package):
    """While the link is down a download waits past its stall timeout; once the link is up
    and still no chunk comes, it fails as transfer_failed."""
    data = repackage(tiny_package, "v2")
    link_up = threading.Event()
    download = new_download(
        tmp_path, data, lambda first, count: link_up.is_set(), stall_s=0.3, online=link_up.is_set
    )
    outcome: list = []

    def consume():
        try:
            b"".join(download.chunks())
        except UpdateRefused as exc:
            outcome.append((exc.reason, link_up.is_set()))

    worker = threading.Thread(target=consume)
    worker.start()
    time.sleep(1.0)  # offline for three stall timeouts
    assert not outcome
    link_up.set()
    worker.join(5)
    assert outcome == [("transfer_failed", True)]


# -- the review's defects: a dying updater, a wedged URL, a stale heartbeat -----------------


def test_install_error_is_reported_and_the_updater_lives_on(
    tmp_path, repo, fleet, mqtt_port, tiny_package
):
    """An install that fails for the device's own reason (the disk full: OSError ENOSPC
    from the slots) is reported failed (internal_error) with v1 still live, and the
    updater thread goes on: the next release installs."""
    import errno

    release, path, v2 = repo.release(repackage(tiny_package, "v2"))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, tiny_package[0], repo)
    real_install = agent.slots.install

    def full_disk(data, **kw):  # the disk edge: what a full filesystem does to a write
        agent.slots.install = real_install
        raise OSError(errno.ENOSPC, "No space left on device")

    agent.slots.install = full_disk
    try:
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.update_events, 30, what="the failure report")
        report = agent.update_events[-1]
        assert (report.target_version, report.status, report.reason, report.release) == (
            "v2",
            "failed",
            "internal_error",
            release,
        )
        assert agent.model_version == report.running_version == "v1"
        assert agent.updates._thread.is_alive()
        newer, path3, v3 = repo.release(repackage(tiny_package, "v3"))
        repo.offer(transport, newer, path3, v3)
        wait_for(lambda: agent.model_version == "v3", 30, what="v3 live after the failure")
        assert agent.update_events[-1].status == "applied"
    finally:
        agent.stop()
        transport.stop()


class DripServer:
    """A local HTTP server of a target's bytes (a 206 of the range asked): the first
    ``fast`` bytes at once, then ``piece`` bytes every ``every_s``; ``redirect`` answers
    every GET with a 302 there instead. Counts the GETs it gets."""

    def __init__(self, data: bytes, *, fast=0, piece=1, every_s=0.1, redirect=None) -> None:
        import http.server

        server = self
        self.gets = 0
        self.stopped = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.gets += 1
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", redirect)
                    self.end_headers()
                    return
                first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                body = data[int(first) : int(last) + 1]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:fast])
                self.wfile.flush()
                for i in range(fast, len(body), piece):
                    if server.stopped.wait(every_s):
                        return
                    self.wfile.write(body[i : i + piece])
                    self.wfile.flush()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"{HOST}:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}/bucket/p/v2.edgepkg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("drip", "limits"),
    [
        # two chunks at once, then a byte every 0.1 s: no whole chunk for url_timeout_s
        ({"fast": 2 * CHUNK, "piece": 1, "every_s": 0.1}, {"url_timeout_s": 1.0}),
        # half a chunk every 0.2 s: steady progress, but past the URL's overall deadline
        ({"piece": CHUNK // 2, "every_s": 0.2}, {"url_timeout_s": 3.0, "url_deadline_s": 1.5}),
    ],
    ids=["stalled", "past-deadline"],
)
def test_dripping_url_falls_back_to_mqtt_in_time(tmp_path, tiny_package, drip, limits):
    """A URL whose server drips bytes (never quiet long enough for a socket timeout)
    gives what whole chunks it delivered, and MQTT the rest, within the URL's limits; a
    download cancelled while the URL drips stops at once."""
    data = repackage(tiny_package, "v2")
    server = DripServer(data, **drip)
    downloads: list = [None]
    asked: list = []
    downloads[0] = new_download(
        tmp_path, data, feeder(data, downloads, asked), url=server.url, **limits
    )
    outcome: list = []

    def consume(download):
        try:
            outcome.append(b"".join(download.chunks()))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    try:
        t0 = time.monotonic()
        worker = threading.Thread(target=consume, args=(downloads[0],), daemon=True)
        worker.start()
        worker.join(15)
        assert outcome == [data], "the download finished, bit for bit"
        assert time.monotonic() - t0 < 10
        assert server.gets == 1 and asked and asked[0][0] >= 2  # the URL's chunks kept
        downloads[0].discard()
        outcome.clear()
        downloads[0] = new_download(tmp_path, data, lambda first, count: True, url=server.url)
        worker = threading.Thread(target=consume, args=(downloads[0],), daemon=True)
        worker.start()
        time.sleep(0.5)
        downloads[0].cancel()
        worker.join(3)
        assert len(outcome) == 1 and isinstance(outcome[0], TransferCancelled)
    finally:
        server.close()


def test_url_on_a_host_not_allowed_is_never_fetched(tmp_path, repo, fleet, mqtt_port, tiny_package):
    """Offers are unsigned: a URL on a host not in fetch_url_hosts is never requested,
    nor is one an allowed host redirects to; both devices install over MQTT."""
    release, path, v2 = repo.release(repackage(tiny_package, "v2"), devices=("d1", "d2"))
    transport = start_transport(mqtt_port, repo.store, fleet)
    elsewhere = DripServer(v2, fast=len(v2))
    allowed = DripServer(v2, redirect=elsewhere.url)
    agents = [
        enrolled_agent(
            tmp_path,
            fleet,
            mqtt_port,
            tiny_package[0],
            repo,
            device=d,
            fetch_urls=True,
            fetch_url_hosts=f"{allowed.host},s3.example:443",
        )
        for d in ("d1", "d2")
    ]
    try:
        for device, url in (("d1", elsewhere.url), ("d2", allowed.url)):
            transport.offer(
                fleet=fleet,
                device_id=device,
                release=release,
                target_path=path,
                length=len(v2),
                bundle=repo.signer.bundle(),
                url=url,
            )
        for agent in agents:
            wait_for(lambda a=agent: a.model_version == "v2", 30, what="v2 live")
        assert elsewhere.gets == 0 and allowed.gets == 1
        for device in ("d1", "d2"):
            assert sorted(set(requested(transport, device))) == list(range(-(-len(v2) // CHUNK)))
    finally:
        for agent in agents:
            agent.stop()
        transport.stop()
        elsewhere.close()
        allowed.close()


def test_heartbeat_speaks_for_the_live_model_and_memory_now(tmp_path, tiny_package, tep_small):
    """After a swap, and after the automatic rollback, the heartbeat's latencies are the
    live model's only; memory_mb is the resident set now, not the peak an install (or
    anything else) once reached."""
    import resource

    agent = EdgeAgent(EdgeSettings(fleet="f", device_id="d1", mqtt_port=9, state_dir=tmp_path))
    agent.bootstrap(tiny_package[0])
    window = windows_of(tep_small[1], "idv_01", 1)[0]
    try:
        for _ in range(5):
            agent.process(window)
        assert agent.heartbeat().latency_ms_p99 > 0
        agent._swap(agent.slots.install(nan_on_live_data(tiny_package, "v2-bad")))
        hb = agent.heartbeat()
        assert (hb.latency_ms_p50, hb.latency_ms_p99, hb.recent_windows) == (0.0, 0.0, 0)
        agent.latencies_ms.append(1e6)  # as if v2-bad had been slow on a window
        with pytest.raises(PackageError):
            agent.process(window)  # rolled back to v1
        assert agent.model_version == "v1"
        assert agent.heartbeat().latency_ms_p99 == 0.0
        peak = b"\x01" * (192 << 20)  # touched pages: resident, then handed back
        del peak
        hb = agent.heartbeat()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - hb.memory_mb > 150
        assert hb.memory_mb > 20  # Python, numpy and ONNX Runtime at least
    finally:
        agent.stop()


def test_repeated_chunk_requests_are_served_once(
    tmp_path, s3_store, fleet, mqtt_port, tiny_package
):
    """A burst of the same chunk request from one device (a device re-asking faster than
    its chunks come) queues each chunk once; another device asking the same is served."""
    from shared.messages import ChunkRequest, decode

    s3_store.put(package_key(fleet, "cpu-fp32", "v1"), tiny_package[0])
    transport = start_transport(mqtt_port, s3_store, fleet, repeat_s=10.0)
    got: dict = {"d1": [], "d2": []}
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    device.on_message = lambda c, u, m: got[m.topic.split("/")[-2]].append(
        decode("updates", m.payload).index
    )
    device.connect(HOST, mqtt_port)
    for d in got:
        device.subscribe(topic(fleet, d, "updates"), qos=1)
    device.loop_start()

    def ask(device_id, first=0, count=8):
        req = ChunkRequest(
            fleet=fleet,
            device_id=device_id,
            target="cpu-fp32/v1.edgepkg",
            release=1,
            first=first,
            count=count,
        )
        device.publish(topic(fleet, device_id, "update-status"), req.encode(), qos=1)

    try:
        time.sleep(0.3)  # the SUBACKs
        for _ in range(10):
            ask("d1")
        ask("d1", first=4, count=8)  # overlaps: only chunks 8-11 are new
        ask("d2")
        wait_for(lambda: len(transport.served) == 12, 10, what="every request handled")
        wait_for(lambda: len(got["d1"]) >= 12 and len(got["d2"]) >= 8, 10, what="chunks")
        time.sleep(0.5)  # any copy would have come by now
        assert sorted(got["d1"]) == list(range(12)) and sorted(got["d2"]) == list(range(8))
        assert transport.chunks_sent == 20 and transport.repeats == 9 * 8 + 4
    finally:
        device.loop_stop()
        transport.stop()


def test_transport_queue_is_bounded(tmp_path, spare_broker, s3_store, fleet, tiny_package):
    """With the broker gone, chunks past the transport's queue bound are dropped at once
    (the device asks again), not held in memory."""
    from shared.messages import ChunkRequest

    s3_store.put(package_key(fleet, "cpu-fp32", "v1"), tiny_package[0])
    transport = start_transport(spare_broker.port, s3_store, fleet, max_queued=4)
    req = ChunkRequest(
        fleet=fleet, device_id="d1", target="cpu-fp32/v1.edgepkg", release=1, first=0, count=8
    )
    try:
        spare_broker.stop()
        wait_for(lambda: not transport.client.is_connected(), 10, what="the link down")
        assert transport.serve(topic(fleet, "d1", "update-status"), req.encode()) == 4
        assert transport.chunks_dropped == 4
        other = req.model_copy(update={"device_id": "d2"})
        assert transport.serve(topic(fleet, "d2", "update-status"), other.encode()) == 0
        assert transport.chunks_dropped == 12
    finally:
        transport.stop()
