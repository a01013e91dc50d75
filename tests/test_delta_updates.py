"""Delta updates end to end: a signed delta target beside the package, applied by real edge
agents over real Mosquitto (or refused, and the package taken instead), and a rollout to a
mixed fleet — devices on different versions, one agent that takes only packages — that
sends each device the delta from its own model and records the bytes in the MLflow run."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from cloud.config import CloudSettings
from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.rollout import controller
from cloud.rollout.deltas import delta_assignments, delta_path, lineage
from cloud.rollout.signing import Assignment
from cloud.store.db import Delta, Device, DeviceUpdate, Fleet, ModelVersion, session_factory
from cloud.store.keys import delta_key, package_key
from cloud.tracking.registry import Registry
from cloud.tracking.rollouts import RolloutTracker
from shared import delta as codec
from shared.package import ModelPackage, model_name
from tests.conftest import HOST, wait_for, windows_of
from tests.fleetkit import Feeder, register_package
from tests.test_transfer import FleetRepo, enrolled_agent, start_transport

pytestmark = pytest.mark.services
PROFILE = "cpu-fp32"


def head_tuned(tiny_package, tep_small, version: str, *, steps: int, seed: int) -> bytes:
    """The fixture's model with only its head trained ``steps`` more steps on real TEP
    windows (a head-only update, as a round that learns little changes), packaged as
    ``version``."""
    from cloud.model.export import package_model

    pkg, model = tiny_package
    data, _ = tep_small
    m = ModelPackage(pkg).manifest
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.05)
    model.eval()  # the body stays as it was, normalisation statistics included
    for _ in range(steps):
        idx = torch.randint(0, len(data.x), (64,))
        x, y = torch.as_tensor(data.x[idx]), torch.as_tensor(data.y[idx]).long()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return package_model(model, name=m.name, version=version, parent="v1", profile=m.profile,
                         class_names=list(m.class_names), ood=m.metadata["ood"])  # fmt: skip


@pytest.fixture(scope="module")
def versions(tiny_package, tep_small) -> dict[str, bytes]:
    """v1 (the fixture's package), v2 and v3: real successive head updates."""
    return {
        "v1": tiny_package[0],
        "v2": head_tuned(tiny_package, tep_small, "v2", steps=5, seed=1),
        "v3": head_tuned(tiny_package, tep_small, "v3", steps=10, seed=2),
    }


def sign(repo: FleetRepo, packages: dict[str, bytes], deltas: dict[str, tuple[bytes, bytes]],
         assign: dict[str, str]) -> int:  # fmt: skip
    """Store and sign a release: each device in ``assign`` gets that version's package, and
    the delta ``deltas[device] = (base package, delta bytes)`` where given."""
    out, by_version = [], {}
    for device, version in assign.items():
        by_version.setdefault(version, []).append(device)
    for version, devices in by_version.items():
        pkg = packages[version]
        repo.store.put(package_key(repo.fleet, PROFILE, version), pkg)
        out.append(Assignment(f"{PROFILE}/{version}.edgepkg", hashlib.sha256(pkg).hexdigest(),
                              len(pkg), repo.fleet, PROFILE, version, tuple(devices)))  # fmt: skip
    for device, (base, data) in deltas.items():
        version, base_sha = assign[device], hashlib.sha256(base).hexdigest()
        repo.store.put(delta_key(repo.fleet, PROFILE, version, base_sha), data)
        out.append(Assignment(delta_path(PROFILE, version, base_sha),
                              hashlib.sha256(data).hexdigest(), len(data), repo.fleet, PROFILE,
                              version, (device,), kind="delta", base=base_sha))  # fmt: skip
    return repo.signer.publish(out)


def offer_delta(repo, transport, release, device, version, base, data) -> None:
    transport.offer(fleet=repo.fleet, device_id=device, release=release,
                    target_path=delta_path(PROFILE, version, hashlib.sha256(base).hexdigest()),
                    length=len(data), bundle=repo.signer.bundle(),
                    payload_kind="delta")  # fmt: skip


@pytest.fixture
def repo(tmp_path, s3_store, fleet):
    return FleetRepo(s3_store, fleet, tmp_path / "keys")


def test_agent_rebuilds_the_target_from_a_signed_delta_over_mqtt(
    tmp_path, repo, fleet, mqtt_port, versions
):
    """An agent on v1 offered the delta v1 → v2 downloads only the delta's chunks, rebuilds
    v2 bit for bit (the signed sha256) in its spare slot and reports it applied by delta."""
    v1, v2 = versions["v1"], versions["v2"]
    data = codec.encode(v1, v2)
    release = sign(repo, versions, {"d1": (v1, data)}, {"d1": "v2"})
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, v1, repo)
    try:
        offer_delta(repo, transport, release, "d1", "v2", v1, data)
        wait_for(lambda: agent.model_version == "v2", 60, what="v2 live from the delta")
        report = [e for e in agent.update_events if e.status == "applied"][-1]
        assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
        assert report.payload == "delta" and report.received_bytes == len(data)
        assert {s.target for s in transport.served} == {
            delta_path(PROFILE, "v2", hashlib.sha256(v1).hexdigest())
        }
        assert len(data) * 4 < len(v2)  # a head-only update: far smaller than the package
        assert "delta" in agent.heartbeat().capabilities
    finally:
        agent.stop()
        transport.stop()


REFUSALS = {
    "wrong_result": "delta_hash_mismatch",  # signed, but rebuilds another package
    "bomb": "delta_too_large",  # expands past the package's signed length
    "truncated": "delta_truncated",  # signed as it is: cut short before it was signed
    "corrupt": "delta_bad_hash",  # bytes changed in the store: TUF's hash check refuses
}


@pytest.mark.parametrize("fault", sorted(REFUSALS))
def test_a_bad_delta_is_refused_before_the_slot_is_written_and_the_package_comes(
    tmp_path, repo, fleet, mqtt_port, versions, fault
):
    """A delta that rebuilds something else, would expand past the signed length, was cut
    short, or changed after signing is refused with its reason before the spare slot is
    touched; the agent then takes the whole package and ends on the signed target."""
    v1, v2, v3 = versions["v1"], versions["v2"], versions["v3"]
    signed = codec.encode(v1, {"wrong_result": v3, "bomb": v2 + b"\0" * 4096}.get(fault, v2))
    if fault == "truncated":
        signed = signed[: len(signed) // 2]
    release = sign(repo, versions, {"d1": (v1, signed)}, {"d1": "v2"})
    if fault == "corrupt":  # the same length, one byte changed
        bad = bytearray(signed)
        bad[len(bad) // 2] ^= 0xFF
        repo.store.put(delta_key(fleet, PROFILE, "v2", hashlib.sha256(v1).hexdigest()), bytes(bad))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, v1, repo)
    spare = tmp_path / "d1" / "models"
    before = {p.name: p.read_bytes() for p in spare.glob("slot-*")}
    writes: list[str] = []
    real_apply = agent.updates.slots.install_delta

    def watched(*a, **kw):
        try:
            return real_apply(*a, **kw)
        finally:
            writes.append(str({p.name: p.read_bytes() for p in spare.glob("slot-*")} == before))

    agent.updates.slots.install_delta = watched
    try:
        offer_delta(repo, transport, release, "d1", "v2", v1, signed)
        wait_for(lambda: agent.model_version == "v2", 90, what="v2 live from the package")
        report = [e for e in agent.update_events if e.status == "applied"][-1]
        assert agent.runtime.package.sha256 == hashlib.sha256(v2).hexdigest()
        assert (report.payload, report.delta_refused) == ("package", REFUSALS[fault])
        # Both downloads are counted: the delta (all of it arrived) and the package.
        assert report.received_bytes == len(signed) + len(v2)
        assert f"{PROFILE}/v2.edgepkg" in {s.target for s in transport.served}
        # The refused delta left both slots as they were (corrupt never reached apply).
        assert writes == ([] if fault == "corrupt" else ["True"])
        assert not list(spare.glob("*.tmp"))
    finally:
        agent.stop()
        transport.stop()


def test_a_delta_that_never_arrives_gives_way_to_the_package(
    tmp_path, repo, fleet, mqtt_port, versions
):
    """A signed delta whose chunks never come (its object left the store) stalls once; the
    agent then takes the package and remembers not to try that delta again."""
    v1, v2 = versions["v1"], versions["v2"]
    data = codec.encode(v1, v2)
    release = sign(repo, versions, {"d1": (v1, data)}, {"d1": "v2"})
    repo.store.delete(delta_key(fleet, PROFILE, "v2", hashlib.sha256(v1).hexdigest()))
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, v1, repo, transfer_stall_s=3.0)
    try:
        offer_delta(repo, transport, release, "d1", "v2", v1, data)
        wait_for(lambda: agent.model_version == "v2", 60, what="v2 live from the package")
        report = [e for e in agent.update_events if e.status == "applied"][-1]
        assert (report.payload, report.delta_refused) == ("package", "delta_transfer_failed")
        assert report.received_bytes == len(v2)
        assert transport.bad_requests > 0  # the delta's requests found no object
        # Remembered: the next offer naming this delta goes straight to the package.
        assert agent.updates.deltas.refused == {
            hashlib.sha256(data).hexdigest(): "delta_transfer_failed"
        }
    finally:
        agent.stop()
        transport.stop()


def test_a_delta_for_another_base_is_never_downloaded(tmp_path, repo, fleet, mqtt_port, versions):
    """A release that signs this device a delta from a model it does not run (mix and
    match): the agent takes the package and never asks for the delta."""
    v1, v2, v3 = versions["v1"], versions["v2"], versions["v3"]
    data = codec.encode(v2, v3)
    release = sign(repo, versions, {"d1": (v2, data)}, {"d1": "v3"})
    transport = start_transport(mqtt_port, repo.store, fleet)
    agent = enrolled_agent(tmp_path, fleet, mqtt_port, v1, repo)
    try:
        offer_delta(repo, transport, release, "d1", "v3", v2, data)
        wait_for(lambda: agent.model_version == "v3", 60, what="v3 live from the package")
        assert {s.target for s in transport.served} == {f"{PROFILE}/v3.edgepkg"}
        assert [e for e in agent.update_events if e.status == "applied"][-1].payload == "package"
    finally:
        agent.stop()
        transport.stop()


# --- a rollout to a mixed fleet --------------------------------------------------------------


def test_rollout_sends_each_device_the_delta_from_its_own_version(
    tmp_path, pg_url, s3_store, fleet, mqtt_port, mlflow_uri, versions, tep_small
):
    """Devices on v1 and v2 (delta-capable) and one agent that takes only packages, rolled
    out to v3 by the controller over Mosquitto: each capable device gets the delta from its
    own version, the older agent the package; all end on v3's hash; the bytes each was sent
    are in the rollout's MLflow run and the lineage names who applied which delta."""
    sessions = session_factory(pg_url)
    repo = FleetRepo(s3_store, fleet, tmp_path / "keys")
    name = model_name(fleet, PROFILE)
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    mlflow_version = {
        v: register_package(
            sessions=sessions, store=s3_store, registry=registry, fleet=fleet, package=pkg
        )  # fmt: skip
        for v, pkg in versions.items()
    }
    with sessions() as s:
        s.add(Fleet(id=fleet, settings={"rollout_canary_min_devices": 1,
                                        "rollout_dwell_heartbeats": 2}))  # fmt: skip
        for d in ("a1", "a2", "a3", "old"):  # enrolled (`edgeloop fleet enroll`)
            s.add(Device(id=d, fleet=fleet, profile=PROFILE))
        s.commit()
    ingest = IngestService(Ingestor(sessions=sessions, store=s3_store), host=HOST,
                           port=mqtt_port, fleet=fleet, group=None)  # fmt: skip
    ingest.start()
    transport = start_transport(mqtt_port, s3_store, fleet)
    start = {"a1": ("v1", True), "a2": ("v2", True), "a3": ("v2", True), "old": ("v1", False)}
    agents = {
        d: enrolled_agent(
            tmp_path, fleet, mqtt_port, versions[v], repo, device=d, heartbeat_s=0.5, deltas=capable
        )  # fmt: skip
        for d, (v, capable) in start.items()
    }
    feeder = Feeder(list(agents.values()), windows_of(tep_small[0], "normal", 20)).start()
    tracker = RolloutTracker(mlflow_uri)
    try:
        wait_for(lambda: _known(sessions, fleet) == start.keys(), 30, what="devices heard")
        rid = controller.start_rollout(sessions=sessions, fleet=fleet, profile=PROFILE,
                                       mlflow_version=mlflow_version["v3"],
                                       settings=CloudSettings()).id  # fmt: skip
        clock = datetime.now(UTC)
        for _ in range(120):
            clock += timedelta(seconds=2)
            state = controller.advance(sessions=sessions, store=s3_store, signer=repo.signer,
                                       transport=transport, rollout_id=rid, now=clock)  # fmt: skip
            controller.track(sessions=sessions, tracker=tracker, rollout_id=rid)
            if state in ("done", "aborted"):
                break
            time.sleep(0.5)
        assert state == "done", _why(sessions, rid)

        v3 = hashlib.sha256(versions["v3"]).hexdigest()
        assert {d: a.runtime.package.sha256 for d, a in agents.items()} == dict.fromkeys(start, v3)
        with sessions() as s:
            rows = {u.device_id: u for u in s.scalars(
                select(DeviceUpdate).where(DeviceUpdate.rollout_id == rid))}  # fmt: skip
            made = {(d.base_version, d.length) for d in s.scalars(
                select(Delta).where(Delta.fleet == fleet))}  # fmt: skip
            lines = lineage(s, fleet=fleet, profile=PROFILE, version="v3")
        sizes = dict(made)
        for d, (base, capable) in start.items():
            u = rows[d]
            assert u.state == "installed" and u.base_version == base
            if capable:
                assert (u.payload, u.payload_bytes, u.received_bytes) == (
                    "delta",
                    sizes[base],
                    sizes[base],
                )
            else:
                assert u.payload == "package" and u.received_bytes == len(versions["v3"])
        # One delta per base version, each from that version's own package.
        assert set(sizes) == {"v1", "v2"} and all(
            n < len(versions["v3"]) // 4 for n in sizes.values()
        )
        assert {(x.base_version, x.devices) for x in lines} == {
            ("v1", ("a1",)),
            ("v2", ("a2", "a3")),
        }
        # Each chunk request named the device's own payload.
        for d in ("a1", "a2", "a3"):
            assert {t for t in {s.target for s in transport.served if s.device_id == d}} == {
                delta_path(PROFILE, "v3", hashlib.sha256(versions[start[d][0]]).hexdigest())
            }
        run = tracker.client.get_run(_run_id(sessions, rid))
        assert run.data.metrics["devices_by_delta"] == 3
        assert run.data.metrics["bytes_full"] == 4 * len(versions["v3"])
        assert run.data.metrics["bytes_received"] == sizes["v1"] + 2 * sizes["v2"] + len(
            versions["v3"]
        )
        path = tracker.client.download_artifacts(
            run.info.run_id, controller.TRANSFERS, str(tmp_path)
        )
        table = json.loads(Path(path).read_text())
        cols = table["columns"]
        got = {r[cols.index("device")]: r[cols.index("payload")] for r in table["data"]}
        assert got == {"a1": "delta", "a2": "delta", "a3": "delta", "old": "package"}
        tags = tracker.client.get_model_version(name, mlflow_version["v1"]).tags
        assert tags["delta_to_v3"].startswith(f"{sizes['v1']} bytes")
    finally:
        feeder.stop()
        for agent in agents.values():
            agent.stop()
        transport.stop()
        ingest.stop()


def _known(sessions, fleet) -> set[str]:
    with sessions() as s:
        return {d.id for d in s.scalars(select(Device).where(Device.fleet == fleet))
                if d.model_version and d.capabilities}  # fmt: skip


def _run_id(sessions, rid) -> str:
    with sessions() as s:
        return controller._get(s, rid, lock=False).mlflow_run_id


def _why(sessions, rid) -> str:
    with sessions() as s:
        r = controller._get(s, rid, lock=False)
        rows = s.scalars(select(DeviceUpdate).where(DeviceUpdate.rollout_id == rid)).all()
        return f"{r.state} {r.reason} " + ", ".join(
            f"{u.device_id}:{u.state}:{u.reason}" for u in rows
        )


def test_the_cloud_makes_each_pair_once_again_when_gone_and_never_from_wrong_bytes(
    pg_url, s3_store, fleet, versions
):
    """A pair's delta is made once and cached (object store + row); made again if its
    object left the store; none when a package is gone or is not the recorded bytes (those
    devices take the package), and none for agents without the capability."""
    sessions = session_factory(pg_url)
    name = model_name(fleet, PROFILE)
    with sessions() as s:
        mvs = {}
        for i, (v, pkg) in enumerate(versions.items()):
            s3_store.put(package_key(fleet, PROFILE, v), pkg)
            mvs[v] = ModelVersion(name=name, version=v, mlflow_version=str(i + 1), profile=PROFILE,
                                  sha256=hashlib.sha256(pkg).hexdigest(),
                                  object_key=package_key(fleet, PROFILE, v),
                                  class_names=["normal"])  # fmt: skip
            s.add(mvs[v])
        devices = {
            "a": Device(id=f"{fleet}a", fleet=fleet, profile=PROFILE, model_version="v1",
                        capabilities=["tuf", "package", "delta"]),
            "b": Device(id=f"{fleet}b", fleet=fleet, profile=PROFILE, model_version="v2",
                        capabilities=["tuf", "package", "delta"]),
            "old": Device(id=f"{fleet}o", fleet=fleet, profile=PROFILE, model_version="v1",
                          capabilities=["tuf", "package"]),
        }  # fmt: skip
        s.add_all(devices.values())
        s.flush()

        def assignments(**kw):
            return delta_assignments(session=s, store=s3_store, fleet=fleet, profile=PROFILE,
                                     devices={d.id: d for d in devices.values()},
                                     assign={d.id: "v3" for d in devices.values()},
                                     version=mvs.get, **kw)  # fmt: skip

        first = assignments()
        key = delta_key(fleet, PROFILE, "v3", mvs["v1"].sha256)
        made = s3_store.get(key)
        again = assignments()
        s3_store.delete(key)
        remade = assignments()
        s3_store.put(package_key(fleet, PROFILE, "v2"), versions["v1"])  # not v2's bytes
        s.query(Delta).filter(Delta.base_version == "v2").delete()
        wrong = assignments()
        rollback = assignments(make=False)  # only what exists: v1 → v3

    by_base = {a.base: a for a in first}
    assert set(by_base) == {mvs["v1"].sha256, mvs["v2"].sha256}
    assert by_base[mvs["v1"].sha256].devices == (devices["a"].id,)  # not the old agent
    assert hashlib.sha256(made).hexdigest() == by_base[mvs["v1"].sha256].sha256
    assert again == first and remade == first and s3_store.exists(key)
    assert [a.base for a in wrong] == [mvs["v1"].sha256]  # v2's bytes are not v2
    assert rollback == [a for a in first if a.base == mvs["v1"].sha256]
