"""The rollout controller against real PostgreSQL, a real fleet TUF repository and real
offers over Mosquitto; devices simulated by the heartbeats and update statuses they send,
recorded by the real ingest logic."""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from hashlib import sha256

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from cloud.config import CloudSettings
from cloud.ingest.ingestor import Ingestor
from cloud.rollout import controller
from cloud.rollout.fleet import fleet_status, format_status
from cloud.rollout.settings import RolloutSettings
from cloud.rollout.signing import ReleaseSigner, init_fleet_trust
from cloud.rollout.transport import RolloutTransport
from cloud.store.db import Device, DeviceUpdate, Fleet, ModelVersion, Rollout, session_factory
from cloud.store.keys import package_key
from cloud.store.objects import LocalObjectStore
from shared.errors import ConfigError
from shared.messages import Heartbeat, UpdateOffer, UpdateStatus
from shared.package import model_name
from shared.topics import topic
from tests.conftest import wait_for

PROFILE = "rpi4-int8"  # budgets: p99 5 ms, 150 MB
SITES = ("north", "south", "east")


class Offers:
    """Every offer the broker delivers on the fleet's update topics, by device."""

    def __init__(self, fleet: str, port: int) -> None:
        self.by_device: dict[str, list[UpdateOffer]] = defaultdict(list)
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgeloop/v1/{fleet}/+/updates", qos=1)
        self.client.loop_start()
        wait_for(subscribed.is_set, 10, what="offer subscription")

    def _on_message(self, client, userdata, msg) -> None:
        offer = UpdateOffer.model_validate_json(msg.payload)
        with self.lock:
            self.by_device[offer.device_id].append(offer)

    def take(self, device: str) -> list[UpdateOffer]:
        with self.lock:
            return self.by_device.pop(device, [])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Plant:
    """The fleet's devices as the cloud hears them: heartbeats and update statuses through
    the ingest logic; each follows the offers it gets, reading its version from the offer."""

    def __init__(self, sessions, store, fleet: str, n: int) -> None:
        self.fleet = fleet
        self.ingest = Ingestor(sessions=sessions, store=store)
        self.version = {f"d{i}": "v1" for i in range(n)}
        self.release = dict.fromkeys(self.version, 0)
        self.rate = dict.fromkeys(self.version, 0.05)  # anomaly rate of the live model
        self.silent: set[str] = set()  # devices offline: no offer reaches them, no heartbeat
        self.profile = dict.fromkeys(self.version, PROFILE)

    def beat(self, device: str, **kw) -> None:
        hb = Heartbeat(
            fleet=self.fleet,
            device_id=device,
            model_version=self.version[device],
            profile=self.profile[device],
            buffer_depth=0,
            windows_seen=1000,
            anomaly_rate=self.rate[device],
            recent_windows=400,
            latency_ms_p50=1.0,
            latency_ms_p99=2.0,
            memory_mb=90.0,
            release=self.release[device],
            **kw,
        )
        self.ingest.handle(topic(self.fleet, device, "heartbeat"), hb.encode())

    def status(self, device: str, version: str, status: str, reason: str | None = None) -> None:
        if status == "applied":
            self.version[device] = version
        msg = UpdateStatus(
            fleet=self.fleet,
            device_id=device,
            target_version=version,
            status=status,
            reason=reason,
            running_version=self.version[device],
            release=self.release[device],
        )
        self.ingest.handle(topic(self.fleet, device, "update-status"), msg.encode())

    def follow(self, offers: Offers, *, bad: dict[str, float] | None = None) -> set[str]:
        """Every device with a new offer installs its version and heartbeats on it (at the
        anomaly rate ``bad`` gives that version, else 0.05); the devices that moved. A
        device in ``silent`` hears nothing."""
        moved = set()
        for device in self.version:
            for offer in offers.take(device):
                if device in self.silent or offer.release < self.release[device]:
                    continue  # as an agent drops an offer older than what it has seen
                version = offer.target.rsplit("/", 1)[1].removesuffix(".edgepkg")
                self.release[device] = max(self.release[device], offer.release)
                if version != self.version[device]:
                    self.status(device, version, "applied")
                    self.rate[device] = (bad or {}).get(version, 0.05)
                    moved.add(device)
        return moved

    def beat_all(self, times: int = 1) -> None:
        for _ in range(times):
            for device in set(self.version) - self.silent:
                self.beat(device)


@pytest.fixture
def world(pg_url, mqtt_port, fleet, tmp_path):
    """A fleet of 8 devices on v1 over three sites, v1 and v2 registered, its TUF
    repository, a started transport and the offers the broker delivers."""
    sessions = session_factory(pg_url)
    store = LocalObjectStore(tmp_path / "objects")
    init_fleet_trust(store=store, fleet=fleet, keys_dir=tmp_path / "keys",
                     offline_dir=tmp_path / "offline")  # fmt: skip
    name = model_name(fleet, PROFILE)
    with sessions() as s:
        # Canaries of two, dwell of two heartbeats: this fleet's overrides of the defaults.
        s.add(Fleet(id=fleet, settings={"rollout_canary_min_devices": 2,
                                        "rollout_dwell_heartbeats": 2}))  # fmt: skip
        for i, version in enumerate(("v1", "v2", "v3")):
            # The controller only signs hashes and lengths; the transport serves these bytes.
            data = f"edge package {version} of {fleet}".encode() * 64
            store.put(package_key(fleet, PROFILE, version), data)
            s.add(ModelVersion(name=name, version=version, mlflow_version=str(i + 1),
                               profile=PROFILE, sha256=sha256(data).hexdigest(),
                               object_key=package_key(fleet, PROFILE, version),
                               class_names=["normal", "idv_01"]))  # fmt: skip
        for i in range(8):
            s.add(Device(id=f"d{i}", fleet=fleet, profile=PROFILE, model_version="v1",
                         site=SITES[i % 3]))  # fmt: skip
        s.commit()
    transport = RolloutTransport(host="127.0.0.1", port=mqtt_port, store=store)
    transport.start()
    wait_for(transport.ready.is_set, 10, what="transport ready")
    offers = Offers(fleet, mqtt_port)
    plant = Plant(sessions, store, fleet, 8)
    plant.beat_all()
    signer = ReleaseSigner(store=store, fleet=fleet, keys_dir=tmp_path / "keys")
    w = World(sessions, store, signer, transport, offers, plant, fleet)
    yield w
    offers.close()
    transport.stop()
    plant.ingest.close()


class World:
    def __init__(self, sessions, store, signer, transport, offers, plant, fleet) -> None:
        self.sessions, self.store, self.signer = sessions, store, signer
        self.transport, self.offers, self.plant, self.fleet = transport, offers, plant, fleet
        self.clock = datetime.now(UTC)

    def start(self, mlflow_version: str = "2", profile: str = PROFILE) -> int:
        r = controller.start_rollout(sessions=self.sessions, fleet=self.fleet, profile=profile,
                                     mlflow_version=mlflow_version, trigger="alias",
                                     settings=CloudSettings())  # fmt: skip
        return r.id

    def advance(self, rollout_id: int, transport=None) -> str:
        self.clock += timedelta(seconds=5)
        return controller.advance(sessions=self.sessions, store=self.store, signer=self.signer,
                                  transport=transport or self.transport, rollout_id=rollout_id,
                                  now=self.clock)  # fmt: skip

    def rollout(self, rollout_id: int) -> Rollout:
        with self.sessions() as s:
            return s.get(Rollout, rollout_id)

    def rows(self, rollout_id: int) -> dict[str, DeviceUpdate]:
        with self.sessions() as s:
            q = select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout_id)
            return {u.device_id: u for u in s.scalars(q)}

    def releases(self) -> list[dict[str, set[str]]]:
        """Every signed release so far: version → devices assigned it."""
        out = []
        for n in range(1, self.signer.current_release() + 1):
            signed = json.loads(self.store.get(f"tuf/{self.fleet}/{n}.releases.json"))["signed"]
            out.append({t["custom"]["edgeloop"]["version"]: set(t["custom"]["edgeloop"]["devices"])
                        for t in signed["targets"].values()})  # fmt: skip
        return out

    def wait_offers(self, rollout_id: int) -> None:
        """Until the offers of the last step have reached the subscriber."""
        now = self.clock
        expect = {d for d, u in self.rows(rollout_id).items() if u.sent_at == now}
        wait_for(lambda: expect <= set(self.offers.by_device), 10, what="offers delivered")

    def drive(self, rollout_id: int, *, bad=None, until=("done", "aborted"), steps=40) -> str:
        """Advance, let the devices follow the offers and heartbeat, until ``until``."""
        state = ""
        for _ in range(steps):
            state = self.advance(rollout_id)
            if state in until:
                return state
            self.wait_offers(rollout_id)
            self.plant.follow(self.offers, bad=bad)
            self.plant.beat_all()
        raise AssertionError(f"rollout {rollout_id} still {state} after {steps} steps")


def test_healthy_canaries_then_waves_until_every_device_is_on_the_target(world):
    """Healthy canaries (two, from two sites) → waves of 4 and 2 → done; every device
    runs v2, the last release assigns v2 to all of them, and each row is installed."""
    rid = world.start()

    state = world.drive(rid)

    r = world.rollout(rid)
    assert state == "done" and r.finished_at is not None
    assert [len(w) for w in r.plan] == [2, 4, 2]
    with world.sessions() as s:
        sites = {s.get(Device, d).site for d in r.plan[0]}
        devices = s.scalars(select(Device).where(Device.fleet == world.fleet)).all()
    assert len(sites) == 2
    assert {d.model_version for d in devices} == {"v2"}
    assert {u.state for u in world.rows(rid).values()} == {"installed"}
    assert world.releases()[-1] == {"v2": {f"d{i}" for i in range(8)}}
    assert r.health["abort"] is False and r.health["p_value"] is not None
    assert r.release == world.signer.current_release()
    with world.sessions() as s:
        status = fleet_status(session=s, fleet=world.fleet)
    assert {(row.rollout_id, row.rollout_state) for row in status} == {(rid, "installed")}
    assert {(row.site, row.anomaly_rate, row.latency_ms_p99, row.memory_mb) for row in status} == {
        (site, 0.05, 2.0, 90.0) for site in SITES
    }
    assert f"{rid}:installed" in format_status(status, {})


def test_anomaly_jump_on_canaries_rolls_them_back_and_no_one_else_gets_the_model(world):
    """Canaries at 30% anomalies after v2 (5% before) abort the rollout; a new release gives
    them v1 again, they go back, and no release ever assigned v2 outside the canaries."""
    rid = world.start()

    state = world.drive(rid, bad={"v2": 0.30})

    r = world.rollout(rid)
    canaries = set(r.plan[0])
    assert state == "aborted"
    assert "anomaly rate rose" in r.reason and r.health["p_value"] < 0.01
    for release in world.releases():
        assert release.get("v2", set()) <= canaries
    assert world.releases()[-1] == {"v1": {f"d{i}" for i in range(8)}}
    rows = world.rows(rid)
    assert {d: rows[d].state for d in canaries} == dict.fromkeys(canaries, "rolled_back")
    assert {u.state for d, u in rows.items() if d not in canaries} == {"pending"}
    assert set(world.plant.version.values()) == {"v1"}


@pytest.mark.parametrize("reason", ["smoke_check_failed", "transfer_failed"])
def test_a_failed_install_aborts_at_once(world, reason):
    """One canary's smoke check fails, or its transfer (a canary that cannot be judged
    fails the rollout): the next step aborts without waiting for the dwell."""
    rid = world.start()
    world.advance(rid)
    canaries = world.rollout(rid).plan[0]
    wait_for(lambda: set(canaries) <= set(world.offers.by_device), 10, what="canary offers")
    world.offers.take(canaries[0])
    world.plant.status(canaries[0], "v2", "failed", reason)

    state = world.advance(rid)

    r = world.rollout(rid)
    assert state == "rolling_back"
    assert r.reason == f"wave 0: {canaries[0]} failed ({reason})"
    assert world.releases()[-1]["v1"] == {f"d{i}" for i in range(8)}
    assert world.drive(rid) == "aborted"


class Killed(BaseException):
    """The worker dies (SIGKILL) in the middle of a step."""


class DyingTransport:
    """The real transport, until the worker dies after its first offer of a step."""

    def __init__(self, transport) -> None:
        self.transport, self.offers = transport, 0

    def offer(self, **kw) -> None:
        self.transport.offer(**kw)
        self.offers += 1
        raise Killed

    def target_url(self, fleet: str, target: str) -> str | None:
        return self.transport.target_url(fleet, target)


def test_a_step_killed_midway_is_redone_from_the_rows_and_finishes_once(world):
    """A worker killed in the step that judged the canaries, signed wave 1's release and
    sent its first offer: the rows are as before that step, the step redone signs nothing
    new (the same release) and the rollout finishes once."""
    rid = world.start()
    world.advance(rid)  # canaries sent
    world.wait_offers(rid)
    world.plant.follow(world.offers)
    world.advance(rid)  # … installed: their dwell starts
    world.plant.beat_all(2)
    with pytest.raises(Killed):
        world.advance(rid, transport=DyingTransport(world.transport))
    release = world.signer.current_release()
    r, rows = world.rollout(rid), world.rows(rid)
    assert r.wave == 0
    assert {rows[d].state for d in r.plan[1]} == {"pending"}

    world.advance(rid)

    assert world.signer.current_release() == release
    assert world.rollout(rid).wave == 1 and world.rollout(rid).release == release
    assert world.drive(rid) == "done"
    n = world.signer.current_release()
    assert world.advance(rid) == "done" and world.signer.current_release() == n


def test_pause_resume_and_abort(world):
    """A paused rollout sends nothing; resumed it goes on; an operator's abort rolls back
    what it reached; a finished rollout refuses the verbs with its state."""
    rid = world.start()
    world.advance(rid)
    controller.pause(sessions=world.sessions, rollout_id=rid)
    assert world.advance(rid) == "paused"

    controller.resume(sessions=world.sessions, rollout_id=rid)
    controller.abort(sessions=world.sessions, rollout_id=rid, now=world.clock)

    assert world.rollout(rid).state == "rolling_back"
    assert world.drive(rid) == "aborted"
    with pytest.raises(controller.RolloutError, match="already aborted"):
        controller.abort(sessions=world.sessions, rollout_id=rid)
    with pytest.raises(controller.RolloutError, match="only a pending or running"):
        controller.pause(sessions=world.sessions, rollout_id=rid)
    with pytest.raises(controller.RolloutError, match="no rollout 99999"):
        controller.resume(sessions=world.sessions, rollout_id=99999)


def test_reconcile_starts_a_missed_rollout_and_nothing_when_up_to_date(world):
    """A champion no rollout carries starts one; the same champion again starts none; a
    champion moved back to v1 is a new rollout whose target is the older model."""
    key = (world.fleet, PROFILE)

    started = controller.reconcile(sessions=world.sessions, champions={key: "2"})
    again = controller.reconcile(sessions=world.sessions, champions={key: "2"})
    back = controller.reconcile(sessions=world.sessions, champions={key: "1"})

    assert [r.target_version for r in started] == ["v2"] and started[0].trigger == "reconcile"
    assert again == []
    assert [r.target_version for r in back] == ["v1"]
    assert world.rollout(started[0].id).state == "superseded"
    assert world.drive(back[0].id) == "done"  # every device already runs v1


def test_each_rollout_is_an_mlflow_run_and_tags_its_model_version(world, mlflow_uri):
    """A run in the fleet's experiment: params, a step of metrics per advance (devices on
    the target rising to 8), the fleet-status table; the model version tagged with the
    rollout and its final state; the registry's champions read back for the reconcile."""
    from mlflow import MlflowClient

    from cloud.tracking.rollouts import TABLE, RolloutTracker

    client = MlflowClient(mlflow_uri)
    name = model_name(world.fleet, PROFILE)
    tracker = RolloutTracker(mlflow_uri)
    training = client.create_run(tracker.experiment(world.fleet)).info.run_id
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=f"runs:/{training}/edge_package",
                                    run_id=training)  # fmt: skip
    client.set_registered_model_alias(name, "champion", "2")
    rid = world.start()

    for _ in range(40):
        state = world.advance(rid)
        run_id = controller.track(sessions=world.sessions, tracker=tracker, rollout_id=rid)
        if state == "done":
            break
        world.wait_offers(rid)
        world.plant.follow(world.offers)
        world.plant.beat_all()

    run = client.get_run(run_id)
    history = [m.value for m in client.get_metric_history(run_id, "devices_on_target")]
    assert run.data.params["target"] == "v2" and run.data.params["previous"] == "v1"
    assert run.info.status == "FINISHED" and run.data.tags["rollout_id"] == str(rid)
    assert history[0] == 0 and history[-1] == 8 and history == sorted(history)
    assert TABLE in {a.path for a in client.list_artifacts(run_id)}
    tags = client.get_model_version(name, "2").tags
    assert tags["rollout_id"] == str(rid) and tags["rollout_state"] == "done"
    assert tracker.champions()[(world.fleet, PROFILE)] == "2"
    assert world.rollout(rid).mlflow_run_id == run_id


def test_timestamps_are_re_signed_only_when_near_expiry(world):
    """A timestamp expiring within the window is re-signed (fleets without a TUF root are
    skipped with a warning); one well inside its expiry is left alone."""
    with world.sessions() as s:
        s.add(Fleet(id=f"{world.fleet}-bare"))
        s.commit()
    signers = {world.fleet: world.signer}

    def signer_for(fleet):
        return signers.get(fleet) or ReleaseSigner(store=world.store, fleet=fleet,
                                                   keys_dir=world.store.root)  # fmt: skip

    near = controller.refresh_timestamps(
        sessions=world.sessions, signer_for=signer_for, within=timedelta(days=2)
    )
    far = controller.refresh_timestamps(
        sessions=world.sessions, signer_for=signer_for, within=timedelta(minutes=1)
    )

    assert near == [world.fleet]
    assert far == []


def test_the_worker_registers_the_rollout_tasks_and_beat_entries():
    """The names the webhook receiver and beat call, exactly."""
    from cloud.tasks import app

    names = {"edgeloop.rollout.on_alias", "edgeloop.rollout.advance", "edgeloop.rollout.tick",
             "edgeloop.rollout.reconcile", "edgeloop.rollout.refresh_timestamps"}  # fmt: skip
    beat = {entry["task"] for entry in app.conf.beat_schedule.values()}

    assert names <= set(app.tasks)
    assert names - {"edgeloop.rollout.on_alias", "edgeloop.rollout.advance"} <= beat


def test_rollout_commands_show_and_steer(world, monkeypatch):
    """`rollout status` lists the rollout and details its devices; pause and resume act;
    pausing a finished rollout or an unknown id fails with a clear message."""
    from typer.testing import CliRunner

    from cloud.commands.rollout import rollout_app
    from cloud.config import get_settings

    with world.sessions() as s:
        url = s.get_bind().url.render_as_string(hide_password=False)
    monkeypatch.setenv("EDGELOOP_DATABASE_URL", url)
    get_settings.cache_clear()
    rid = world.start()
    world.advance(rid)
    cli = CliRunner()

    listed = cli.invoke(rollout_app, ["status", "--fleet", world.fleet])
    paused = cli.invoke(rollout_app, ["pause", str(rid)])
    detail = cli.invoke(rollout_app, ["status", str(rid)])
    resumed = cli.invoke(rollout_app, ["resume", str(rid)])
    unknown = cli.invoke(rollout_app, ["pause", "99999"])
    get_settings.cache_clear()

    assert listed.exit_code == 0 and f"{rid}" in listed.stdout and "wave" in listed.stdout
    assert paused.exit_code == 0 and "paused at wave 1" in paused.stdout
    assert detail.exit_code == 0 and "paused" in detail.stdout
    assert sum(" sent " in line for line in detail.stdout.splitlines()) == 2  # the canaries
    assert resumed.exit_code == 0 and "resumed (wave)" in resumed.stdout
    assert unknown.exit_code == 1 and "no rollout 99999" in unknown.stderr


@pytest.fixture
def eager_worker(world, pg_url, mqtt_port, mlflow_uri, tmp_path, monkeypatch):
    """The Celery tasks run in this process (eagerly), on the world's database, store,
    keys, broker and the MLflow server, as a worker configured by env vars would."""
    import cloud.tasks as tasks
    from cloud.config import get_settings

    for key, value in {
        "HOME": str(tmp_path),
        "STORE": "local",
        "DATABASE_URL": pg_url,
        "MQTT_PORT": str(mqtt_port),
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }.items():
        monkeypatch.setenv(f"EDGELOOP_{key}", value)  # fmt: skip
    caches = (get_settings, tasks._services, tasks._transport, tasks._signer, tasks._tracker)
    for cache in caches:
        cache.cache_clear()
    tasks.app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield tasks
    tasks.app.conf.update(task_always_eager=False, task_eager_propagates=False)
    if tasks._transport.cache_info().currsize:
        tasks._transport().stop()
    for cache in caches:
        cache.cache_clear()


def test_the_tasks_carry_a_champion_move_to_every_device(world, eager_worker):
    """on_alias starts the rollout and takes its first step; beat's ticks take it to done
    with every device on v2, and its MLflow run is finished."""
    tasks = eager_worker
    client, name = tasks._tracker().client, model_name(world.fleet, PROFILE)
    training = client.create_run(tasks._tracker().experiment(world.fleet)).info.run_id
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=f"runs:/{training}/edge_package",
                                    run_id=training)  # fmt: skip
    client.set_registered_model_alias(name, "champion", "2")  # on_alias re-reads it

    first = tasks.rollout_on_alias.apply(args=(world.fleet, PROFILE, "2")).get()
    rid = first["rollout"]
    for _ in range(40):
        sent = {d for d, u in world.rows(rid).items() if u.state == "sent"}
        wait_for(lambda s=sent: s <= set(world.offers.by_device), 10, what="offers")
        world.plant.follow(world.offers)
        world.plant.beat_all()
        if tasks.rollout_tick.apply().get().get(rid) == "done":
            break

    r = world.rollout(rid)
    assert first["target"] == "v2" and r.state == "done"
    assert set(world.plant.version.values()) == {"v2"}
    assert r.mlflow_run_id is not None
    assert tasks._tracker().client.get_run(r.mlflow_run_id).info.status == "FINISHED"


def short_timeout(world, seconds: int = 60) -> None:
    with world.sessions() as s:
        row = s.get(Fleet, world.fleet)
        row.settings = {**row.settings, "rollout_wave_timeout_s": seconds}
        s.commit()


def test_a_silent_canary_aborts_the_rollout(world):
    """A canary that never answers within the wave timeout has failed: the canary wave
    aborts, and the rollout ends aborted naming it as not confirmed back."""
    short_timeout(world)
    rid = world.start()
    world.advance(rid)
    silent = world.rollout(rid).plan[0][0]
    world.plant.silent.add(silent)

    state = world.drive(rid)

    r = world.rollout(rid)
    assert state == "aborted"
    assert f"{silent} failed (silent: no status in 60 s)" in r.reason
    assert world.rows(rid)[silent].state == "failed"
    assert r.reason.endswith(f"not confirmed back on the previous model: {silent}")


def test_a_silent_device_after_the_canaries_is_left_out_not_rolled_back(world):
    """A device of a later wave silent past the timeout is marked failed and left out of
    the judgement; the rollout finishes with every other device on the target."""
    short_timeout(world)
    rid = world.start()
    world.advance(rid)
    silent = world.rollout(rid).plan[1][0]
    world.plant.silent.add(silent)

    state = world.drive(rid)

    rows = world.rows(rid)
    assert state == "done"
    assert rows[silent].state == "failed" and rows[silent].reason.startswith("silent: ")
    assert {u.state for d, u in rows.items() if d != silent} == {"installed"}


def test_labelled_accuracy_counts_the_wave_samples_on_each_side(world):
    """Labels on the canaries' samples: the target's since install against the previous
    version's before it; teacher pseudo-labels are not ground truth; an operator's label
    wins over the device's."""
    from cloud.rollout.fleet import label_counts
    from cloud.store.db import Label, Sample

    t0 = world.clock
    rows = [DeviceUpdate(device_id="d0", target_version="v2", base_version="v1",
                         installed_at=t0)]  # fmt: skip
    samples = [  # (version, received, predicted, [(source, label)])
        ("v1", t0 - timedelta(hours=1), "normal", [("device", "normal")]),
        ("v1", t0 - timedelta(hours=1), "normal", [("device", "idv_01")]),
        ("v2", t0 + timedelta(minutes=1), "normal", [("device", "idv_01"), ("operator", "normal")]),
        ("v2", t0 + timedelta(minutes=2), "idv_01", [("device", "normal")]),
        ("v2", t0 + timedelta(minutes=3), "idv_01", [("teacher", "idv_01")]),
        ("v2", t0 - timedelta(days=9), "normal", [("device", "normal")]),  # before install
    ]
    with world.sessions() as s:
        for i, (version, received, predicted, labels) in enumerate(samples):
            s.add(Sample(id=f"s{i}", device_id="d0", fleet=world.fleet, content_sha256="0" * 64,
                         object_key="k", dtype="float32", shape=[8, 2], captured_at=received,
                         received_at=received, model_version=version, predicted=predicted,
                         confidence=0.9, score=0.0))  # fmt: skip
            s.flush()
            for source, label in labels:
                s.add(Label(sample_id=f"s{i}", label=label, source=source))
        s.commit()

        counts = label_counts(s, rows, "v2")

    assert (counts.target_correct, counts.target_total) == (1, 2)
    assert (counts.previous_correct, counts.previous_total) == (1, 2)


def test_two_profiles_of_one_fleet_roll_out_side_by_side(world):
    """Rollouts of two profiles of one fleet, stepped in turn: each release keeps the other
    profile's assignments (a device drops an offer older than what it has seen), and both
    finish with every device on its profile's target."""
    other = "jetson-fp16"
    data = b"jetson package j2" * 64
    with world.sessions() as s:
        world.store.put(package_key(world.fleet, other, "j1"), b"jetson package j1" * 64)
        world.store.put(package_key(world.fleet, other, "j2"), data)
        for i, v in enumerate(("j1", "j2")):
            blob = world.store.get(package_key(world.fleet, other, v))
            s.add(ModelVersion(name=model_name(world.fleet, other), version=v,
                               mlflow_version=str(i + 1), profile=other,
                               sha256=sha256(blob).hexdigest(),
                               object_key=package_key(world.fleet, other, v),
                               class_names=["normal"]))  # fmt: skip
        for i in (8, 9):
            s.add(Device(id=f"d{i}", fleet=world.fleet, profile=other, model_version="j1",
                         site=SITES[0]))  # fmt: skip
        s.commit()
    for d in ("d8", "d9"):
        world.plant.version[d], world.plant.release[d] = "j1", 0
        world.plant.rate[d], world.plant.profile[d] = 0.05, other
    world.plant.beat_all()
    ids = [world.start(), world.start("2", profile=other)]

    states = {}
    for _ in range(40):
        for rid in ids:
            world.clock -= timedelta(seconds=5)  # one tick of the clock steps both
            states[rid] = world.advance(rid)
        if set(states.values()) == {"done"}:
            break
        world.plant.follow(world.offers)
        world.plant.beat_all()

    assert set(states.values()) == {"done"}
    assert world.releases()[-1] == {"v2": {f"d{i}" for i in range(8)}, "j2": {"d8", "d9"}}
    for release in world.releases():
        assert release.get("j1", set()) | release.get("j2", set()) <= {"d8", "d9"}
    assert set(world.plant.version.values()) == {"v2", "j2"}


def drive_to_wave(world, rid: int, wave: int, steps: int = 20) -> None:
    """Advance with every device following and heartbeating until wave ``wave`` is sent."""
    for _ in range(steps):
        world.advance(rid)
        if world.rollout(rid).wave >= wave:
            world.wait_offers(rid)
            return
        world.wait_offers(rid)
        world.plant.follow(world.offers)
        world.plant.beat_all()
    raise AssertionError(f"rollout {rid} never reached wave {wave}")


def test_a_canary_rolling_itself_back_after_its_wave_was_judged_aborts(world):
    """The canaries were judged healthy and wave 1 dwells when a canary rolls itself back
    (inference_error): the next step aborts on it, and the rollout ends aborted."""
    rid = world.start()
    drive_to_wave(world, rid, 1)
    canary = world.rollout(rid).plan[0][0]
    world.plant.version[canary] = "v1"
    world.plant.status(canary, "v2", "rolled_back", "inference_error")

    state = world.advance(rid)

    r = world.rollout(rid)
    assert state == "rolling_back" and r.wave == 1
    assert f"{canary} rolled_back (inference_error)" in r.reason
    assert world.drive(rid) == "aborted"
    assert set(world.plant.version.values()) == {"v1"}


def test_planned_devices_that_left_the_profile_are_failed_not_a_stuck_rollout(world):
    """Two devices of wave 1 leave before it is sent (one re-enrolled with another profile,
    one moved to another fleet): their rows fail "left the profile", are left out of the
    judgement, and the rollout finishes with the others on the target."""
    rid = world.start()
    world.advance(rid)
    moved = world.rollout(rid).plan[1][:2]
    with world.sessions() as s:
        s.get(Device, moved[0]).profile = "jetson-fp16"
        s.get(Device, moved[1]).fleet = f"{world.fleet}-other"
        s.commit()
    for d in moved:
        world.plant.silent.add(d)

    state = world.drive(rid)

    rows = world.rows(rid)
    assert state == "done"
    assert {(rows[d].state, rows[d].reason) for d in moved} == {("failed", "left the profile")}
    assert {u.state for d, u in rows.items() if d not in moved} == {"installed"}
    assert world.rollout(rid).health["devices"] == len(world.rollout(rid).plan[-1])


def test_canaries_without_a_previous_model_keep_the_target_and_are_named(world):
    """Devices with no model yet (a fleet's first model): after the canaries abort, they
    cannot be given "none": their rows fail saying so, the rollout's reason names them,
    and none counts as rolled back."""
    with world.sessions() as s:
        for d in s.scalars(select(Device).where(Device.fleet == world.fleet)):
            d.model_version = None
        s.commit()
    for d in world.plant.version:
        world.plant.version[d] = None
    rid = world.start()

    state = world.drive(rid, bad={"v2": 0.30})

    r, rows = world.rollout(rid), world.rows(rid)
    canaries = sorted(r.plan[0])
    assert state == "aborted"
    assert r.reason.endswith(f"having no previous model (take them out of service): "
                             f"{', '.join(canaries)}")  # fmt: skip
    for d in canaries:
        assert rows[d].state == "failed"
        assert rows[d].reason.startswith("keeps v2: it had no previous model")
    assert "rolled_back" not in {u.state for u in rows.values()}


def test_a_link_refusal_after_the_canaries_is_left_out_and_offered_again(world):
    """A wave-1 device whose transfer fails does not abort the fleet: it is left out of the
    judgement, offered again, installs and the rollout finishes done."""
    with world.sessions() as s:
        row = s.get(Fleet, world.fleet)
        row.settings = {**row.settings, "rollout_resend_s": 5}
        s.commit()
    rid = world.start()
    drive_to_wave(world, rid, 1)
    flaky = world.rollout(rid).plan[1][0]
    world.offers.take(flaky)
    world.plant.status(flaky, "v2", "failed", "transfer_failed")

    state = world.drive(rid)

    r = world.rollout(rid)
    assert state == "done", r.reason
    assert world.rows(rid)[flaky].state == "installed"
    assert world.plant.version[flaky] == "v2"


def test_fleet_overrides_are_coerced_to_the_settings_types_or_refused(world):
    """A fleet's "5" is the integer 5 and "0.5" the share 0.5; "five", a boolean for a
    count, or a list are a ConfigError naming the key and value, also when a rollout of
    that fleet starts."""
    ok = RolloutSettings.resolve(CloudSettings(), {"rollout_dwell_heartbeats": "5",
                                                   "rollout_canary_share": "0.5",
                                                   "rollout_presigned_urls": "true"})  # fmt: skip

    assert (ok.dwell_heartbeats, ok.canary_share, ok.presigned_urls) == (5, 0.5, True)
    assert isinstance(ok.dwell_heartbeats, int)
    for value in ("five", True, [3], 2.5):
        with pytest.raises(ConfigError, match=re.escape(f"rollout_dwell_heartbeats = {value!r}")):
            RolloutSettings.resolve(CloudSettings(), {"rollout_dwell_heartbeats": value})
    with world.sessions() as s:
        row = s.get(Fleet, world.fleet)
        row.settings = {**row.settings, "rollout_alpha": "a lot"}
        s.commit()
    with pytest.raises(ConfigError, match="rollout_alpha = 'a lot'"):
        world.start()
