"""The attacks TUF guards against, sent to a real enrolled agent over the real broker by
someone who controls the network but holds no online key: each is refused with its named
reason, the reason reaches the cloud's update table, and the device keeps serving; a
rotated root is followed without enrolling again."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

from sqlalchemy import select

from cloud.rollout.signing import ReleaseSigner, rotate_root
from cloud.store.db import DeviceUpdate
from cloud.store.keys import package_key
from shared.messages import UpdateOffer
from shared.topics import topic

from .conftest import make_agent, repackage, wait_for, windows_of
from .test_edge_agent import cloud_on  # noqa: F401 - the fixture
from .test_transfer import FleetRepo, start_transport


def test_each_attack_is_refused_reported_and_the_device_keeps_serving(
    tmp_path,
    caplog,
    mqtt_port,
    cloud_on,  # noqa: F811 - the fixture imported above
    s3_store,
    fleet,
    tiny_package,
    tep_small,
):
    """Tampered metadata (bad_signature), a bundle without the releases role
    (missing_metadata), an old release replayed (rollback_attack), a frozen release past its
    expiry (expired_metadata), a target for another device (mix_and_match) and a target
    longer than signed (endless_data): each refused, reported with its reason to the
    update table, the installed model serving all along (the same release under an older
    timestamp, as a late redelivery brings it, is refused without a report); after a root
    rotation that replaces the online keys, a new release installs."""
    sessions, start_ingest = cloud_on
    start_ingest(mqtt_port)
    keys = tmp_path / "keys"
    repo = FleetRepo(s3_store, fleet, keys)
    transport = start_transport(mqtt_port, s3_store, fleet)
    agent = make_agent(tmp_path, fleet, mqtt_port, tiny_package[0], transfer_retry_s=1.0)
    agent.enroll(repo.root)
    normal = windows_of(tep_small[0], "normal", 5)

    def row(version: str):
        with sessions() as s:
            r = s.scalars(select(DeviceUpdate).where(DeviceUpdate.target_version == version)
                          .order_by(DeviceUpdate.id.desc())).first()  # fmt: skip
            return None if r is None else (r.state, r.reason)

    def attack(offer: UpdateOffer, version: str, reason: str) -> None:
        """What a man in the middle does: publish an offer of his own to the device. Its
        answer names the reason, and so does the cloud's update table once it is acked."""
        n = len(agent.update_events)
        transport.client.publish(topic(fleet, "d1", "updates"), offer.encode(), qos=1)
        wait_for(lambda: len(agent.update_events) > n, 30, what="the device's answer")
        answer = agent.update_events[-1]
        assert (answer.target_version, answer.status, answer.reason) == (
            version,
            "rejected",
            reason,
        ), answer
        wait_for(lambda: row(version) == ("rejected", reason), 30, agent.tick,
                 f"{reason} in the update table")  # fmt: skip

    def offer_of(release: int, path: str, bundle: dict[str, str], length: int) -> UpdateOffer:
        # The offer's own release number is unsigned: set high, so that nothing but the
        # signed metadata decides.
        return UpdateOffer(fleet=fleet, device_id="d1", release=release + 100, target=path,
                           length=length, chunk_size=4096, metadata=bundle)  # fmt: skip

    try:
        release, path, v2 = repo.release(repackage(tiny_package, "v2"))
        repo.offer(transport, release, path, v2)
        wait_for(lambda: agent.model_version == "v2", 30, what="v2 installed")
        old_bundle = repo.signer.bundle()

        # A newer release (v3) the attacker tampers with, or strips of its releases role.
        release3, path3, v3 = repo.release(repackage(tiny_package, "v3"))
        bundle = repo.signer.bundle()
        name = next(k for k in bundle if k.endswith(".releases.json"))
        forged = json.loads(bundle[name])
        forged["signed"]["targets"][path3]["length"] += 1
        attack(
            offer_of(release3, path3, {**bundle, name: json.dumps(forged)}, len(v3)),
            "v3",
            "bad_signature",
        )
        stripped = {k: v for k, v in bundle.items() if k != name}
        attack(offer_of(release3, path3, stripped, len(v3)), "v3", "missing_metadata")
        # The v2 release replayed once the device has seen v3's metadata.
        repo.offer(transport, release3, path3, v3)
        wait_for(lambda: agent.model_version == "v3", 30, what="v3 installed")
        attack(offer_of(release, path, old_bundle, len(v2)), "v2", "rollback_attack")

        # The beat re-signs the timestamp of the release the device runs; the same release
        # under the older timestamp, redelivered late, is refused without an alarm.
        stale = repo.signer.bundle()
        assert repo.signer.refresh_timestamp(within=timedelta(days=2))
        n = len(agent.update_events)
        repo.offer(transport, release3, path3, v3)  # runs it already: "applied" again
        wait_for(lambda: len(agent.update_events) > n, 30, what="the repeated offer's answer")
        n = len(agent.update_events)
        with caplog.at_level(logging.INFO, logger="edge_agent.updates"):
            late = UpdateOffer(fleet=fleet, device_id="d1", release=release3, target=path3,
                               length=len(v3), chunk_size=4096, metadata=stale)  # fmt: skip
            transport.client.publish(topic(fleet, "d1", "updates"), late.encode(), qos=1)
            wait_for(lambda: "stale offer" in caplog.text, 30, what="the stale offer dropped")
        assert len(agent.update_events) == n

        # A release signed with a one-second timestamp, held back until it has expired.
        frozen = ReleaseSigner(store=s3_store, fleet=fleet, keys_dir=keys / "online",
                               timestamp_expiry=timedelta(seconds=1))  # fmt: skip
        release4, path4, v4 = repo.release(repackage(tiny_package, "v4"))
        frozen.publish(repo.signer.assignments())  # the same assignments: no new release
        frozen.refresh_timestamp(within=timedelta(days=400))
        held = frozen.bundle()
        time.sleep(1.5)
        attack(offer_of(release4, path4, held, len(v4)), "v4", "expired_metadata")

        # v5 signed for another device of the fleet, offered to this one.
        release5, path5, v5 = repo.release(repackage(tiny_package, "v5"), devices=("d2",))
        attack(offer_of(release5, path5, repo.signer.bundle(), len(v5)), "v5", "mix_and_match")

        # v6 signed as it is; what the device is sent runs on past the signed length (the
        # offer's length is unsigned: the sender says what it likes).
        release6, path6, v6 = repo.release(repackage(tiny_package, "v6"))
        endless = v6 + bytes(40 * 4096)
        s3_store.put(package_key(fleet, "cpu-fp32", "v6"), endless)
        attack(offer_of(release6, path6, repo.signer.bundle(), len(endless)), "v6", "endless_data")
        agent.process(normal[0])  # still detecting, on v3
        serving = agent.model_version

        # Root rotated with new online keys (the recovery from a stolen one): the device
        # follows the chain of roots from its enrollment and installs the next release.
        rotate_root(store=s3_store, fleet=fleet, offline_dir=keys / "offline",
                    keys_dir=keys / "online", online=True)  # fmt: skip
        repo.signer = ReleaseSigner(store=s3_store, fleet=fleet, keys_dir=keys / "online")
        release7, path7, v7 = repo.release(repackage(tiny_package, "v7"))
        repo.offer(transport, release7, path7, v7)
        wait_for(lambda: agent.model_version == "v7", 30, what="v7 after the rotation")
        wait_for(lambda: row("v7") == ("installed", None), 30, agent.tick, "v7 recorded")
    finally:
        agent.stop()
        transport.stop()

    assert serving == "v3"
