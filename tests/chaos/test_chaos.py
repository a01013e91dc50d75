"""Chaos: the whole loop under faults at seeded points, on private services. Real edge
agents upload continuously through two `edgeloop cloud ingest` processes while Mosquitto,
Redis, PostgreSQL and S3 are restarted in turn and an ingest is SIGKILLed mid-batch; a
learning round on a Celery worker is SIGKILLed, and PostgreSQL, Redis and S3 restarted
under it; its model rolls out while beat is SIGKILLed, Mosquitto is restarted, one device's
link is cut in the middle of the update and PostgreSQL restarted while it is cut off.
Afterwards, read back from storage: no accepted sample lost or duplicated, no model version
half-registered, every device on the new model's exact bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
from mlflow import MlflowClient
from sqlalchemy import select

from cloud.learn.runner import train_initial
from cloud.learn.state import RoundConfig
from cloud.model.configs import TrainConfig
from cloud.rollout.signing import init_fleet_trust
from cloud.store.datasets import LabelledWindows, register_dataset
from cloud.store.db import Device, ModelVersion, Rollout, Round, migrate, session_factory
from cloud.store.keys import package_key
from cloud.store.objects import S3ObjectStore
from shared.package import ModelPackage, model_name
from sim.tep import generate
from tests.conftest import HOST, ROOT, S3_KEY, S3_SECRET, TEP_CACHE, unique, wait_for, windows_of
from tests.test_learning import add_uploads

from .device import read_ledger
from .kit import CuttingProxy, Proc, Supervisor, Uploads, account, connected, held_chunks, logs

pytestmark = [pytest.mark.services, pytest.mark.slow]
PROFILE = "cpu-fp32"
CLI = ["-c", "from shared.cli import main; main()"]


def labelled(w):
    return LabelledWindows(w.x, np.array(w.class_names)[w.y])


def seed_fleet(sessions, store, registry, fleet, tep_small, devices, *, epochs=15):
    """As test_learning seeds a fleet, on this run's devices: base, validation and golden
    sets, v1 trained and promoted, and labelled uploads of a fault v1 has never seen (as
    ingest stored them) on the first two devices; the ids of those seeded rows."""
    train, golden = tep_small
    new = generate(classes=["idv_06"], runs_per_class=4, seed=5, horizon_h=4.0,
                   cache_dir=TEP_CACHE, workers=2)  # fmt: skip
    new_golden = generate(classes=["idv_06"], runs_per_class=1, seed=99, horizon_h=4.0,
                          cache_dir=TEP_CACHE)  # fmt: skip
    validation = generate(classes=train.class_names, runs_per_class=1, seed=41, horizon_h=4.0,
                          cache_dir=TEP_CACHE, workers=2)  # fmt: skip
    register_dataset(store=store, name="base", data=labelled(train))
    register_dataset(store=store, name="validation", data=labelled(validation))
    gold = LabelledWindows(
        np.concatenate([golden.x, new_golden.x]),
        np.concatenate([labelled(golden).labels, np.array(["idv_06"] * len(new_golden))]),
    )
    register_dataset(store=store, name="golden", data=gold)
    cfg = RoundConfig(fleet=fleet, train=TrainConfig(epochs=epochs, lr=2e-3))
    train_initial(sessions=sessions, store=store, registry=registry, cfg=cfg)
    with sessions() as s:
        for i, device in enumerate(devices):
            s.add(Device(id=device, fleet=fleet, profile=PROFILE, site=("north", "south")[i % 2],
                         model_version="v1"))  # fmt: skip
        s.commit()
    half = len(new.x) // 2
    ids = add_uploads(sessions, store, fleet, new.x[:half], "idv_06", device=devices[0])
    ids += add_uploads(sessions, store, fleet, new.x[half:], "idv_06", first=half,
                       device=devices[1])  # fmt: skip
    return set(ids)


def cloud_env(svc, url, store, mlflow_uri, fleet, keys) -> dict:
    """Every cloud process of the run: the private services, the shared MLflow server (not
    one of the services restarted), fast rollout ticks, no trigger-started rounds."""
    p = svc.ports
    return {
        **svc.env,
        "EDGELOOP_DATABASE_URL": url,
        "EDGELOOP_STORE": "s3",
        "EDGELOOP_S3_ENDPOINT": f"{HOST}:{p['seaweedfs']}",
        "EDGELOOP_S3_ACCESS_KEY": S3_KEY,
        "EDGELOOP_S3_SECRET_KEY": S3_SECRET,
        "EDGELOOP_S3_BUCKET": store.bucket,
        "EDGELOOP_MLFLOW_TRACKING_URI": mlflow_uri,
        "EDGELOOP_REDIS_URL": f"redis://{HOST}:{p['redis']}/0",
        "EDGELOOP_CELERY_QUEUE": f"q-{fleet}",
        "EDGELOOP_MQTT_PORT": str(p["mosquitto"]),
        "EDGELOOP_TUF_KEYS_DIR": str(keys),
        "EDGELOOP_ROLLOUT_TICK_S": "1",
        "EDGELOOP_ROLLOUT_RECONCILE_S": "2",
        "EDGELOOP_ROLLOUT_SHARED_GROUP": f"r{fleet}",
        "EDGELOOP_ROLLOUT_DWELL_HEARTBEATS": "3",
        "EDGELOOP_ROLLOUT_RESEND_S": "10",
        "EDGELOOP_CELERY_VISIBILITY_TIMEOUT_S": "6",
        "EDGELOOP_ROUND_LOCK_TTL_S": "4",
        "EDGELOOP_ROUND_EPOCHS": "400",  # ~12 s of training idle: faults land in it
        "EDGELOOP_ROUND_DISTILL_EPOCHS": "5",
        "EDGELOOP_TRIGGER_INTERVAL_S": "3600",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
    }


def new_fleet(svc, mlflow_uri):
    """A fleet of its own on the private services: database, bucket, MLflow experiment."""
    from cloud.tracking.registry import Registry

    fleet = unique("chaos")
    pg = f"postgresql://postgres@{HOST}:{svc.ports['postgres']}"
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{fleet}"')
    url = f"postgresql+psycopg://postgres@{HOST}:{svc.ports['postgres']}/{fleet}"
    migrate(url)
    store = S3ObjectStore(endpoint=f"{HOST}:{svc.ports['seaweedfs']}", access_key=S3_KEY,
                          secret_key=S3_SECRET, bucket=fleet)  # fmt: skip
    registry = Registry(mlflow_uri, experiment=f"edgeloop-{fleet}")
    return fleet, pg, url, session_factory(url), store, registry


def test_the_loop_survives_restarts_kills_and_a_cut_link(
    private_services, chaos_plan, chaos_table, tep_small, mlflow_uri, tmp_path
):
    """Faults at the seeded points of chaos_plan; then zero samples lost or duplicated
    (content hashes in rows and objects), v1 and v2 each whole in SQL, S3 and MLflow, the
    round and the rollout done, every device on v2's exact bytes."""
    svc, plan, table = private_services, chaos_plan, chaos_table
    fleet, pg, url, sessions, store, registry = new_fleet(svc, mlflow_uri)
    uploaders = [f"{fleet}-d{i}" for i in range(plan.devices)]
    killable = f"{fleet}-k"  # an agent in a process of its own, SIGKILLed
    updater = f"{fleet}-u"  # takes the update through a link that is cut mid-transfer
    seeded = seed_fleet(sessions, store, registry, fleet, tep_small,
                        [*uploaders, killable, updater])  # fmt: skip
    keys = tmp_path / "keys"
    root = init_fleet_trust(store=store, fleet=fleet, keys_dir=keys, offline_dir=tmp_path / "off")
    v1 = store.get(package_key(fleet, PROFILE, "v1"))
    env = cloud_env(svc, url, store, mlflow_uri, fleet, keys)
    logdir = tmp_path / "logs"
    logdir.mkdir()

    # Prepare: the devices, two ingests in one shared-subscription group, worker and beat.
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeSettings

    proxy = CuttingProxy(svc.ports["mosquitto"]).start()

    def agent(device: str, port: int, **kw) -> EdgeAgent:
        a = EdgeAgent(EdgeSettings(
            fleet=fleet, device_id=device, profile=PROFILE, mqtt_port=port,
            state_dir=tmp_path / device, heartbeat_s=0.5, resend_after_s=2.0,
            upload_bytes_per_hour=10**10, diversity_distance=0.0, **kw))  # fmt: skip
        a.enroll(root)
        a.bootstrap(v1)
        a.start()
        return a

    agents = [agent(d, svc.ports["mosquitto"]) for d in uploaders]
    # The whole package (more chunks than a delta), asked for one chunk at a time.
    cut_agent = agent(updater, proxy.port, deltas=False, transfer_window=1)
    every = [*agents, cut_agent]
    wait_for(lambda: all(a.link.connected.is_set() for a in every), 30, what="agents")
    train, golden = tep_small
    faulty = np.concatenate([windows_of(d, c, 500) for d in (train, golden)
                             for c in ("idv_01", "idv_02", "idv_07")])  # fmt: skip
    files = {"windows": tmp_path / "windows.npy", "root": tmp_path / "root.json",
             "package": tmp_path / "v1.edgepkg"}  # fmt: skip
    np.save(files["windows"], faulty)
    files["root"].write_bytes(root)
    files["package"].write_bytes(v1)
    config = tmp_path / "device.json"
    ledger, status = tmp_path / "ledger.txt", tmp_path / "status.json"
    config.write_text(json.dumps({
        "fleet": fleet, "device": killable, "profile": PROFILE, "port": svc.ports["mosquitto"],
        "state_dir": str(tmp_path / killable), "seed": plan.seed, "ledger": str(ledger),
        "status": str(status), "period_s": 0.05 if plan.full else 0.1,
        **{k: str(v) for k, v in files.items()}}))  # fmt: skip
    device = Proc("agent-k", ["-m", "tests.chaos.device", str(config)],
                  {**os.environ, "PYTHONPATH": str(ROOT)}, logdir).start()  # fmt: skip
    ingest_args = [*CLI, "cloud", "ingest", "--fleet", fleet, "--group", f"i{fleet}"]
    ingests = [Proc(f"ingest-{k}", [*ingest_args, "--slot", str(slot)], env, logdir).start()
               for slot, k in enumerate("ab")]  # fmt: skip
    celery = ["-m", "celery", "-A", "cloud.tasks"]
    worker = Proc("worker", [*celery, "worker", "-Q", f"q-{fleet}", "--pool", "threads",
                             "--concurrency", "2", "--loglevel", "INFO",
                             "--hostname", f"w-{fleet}@%h"], env, logdir).start()  # fmt: skip
    beat = Proc("beat", [*celery, "beat", "--loglevel", "INFO", "--schedule",
                         str(tmp_path / "beat-schedule")], env, logdir).start()  # fmt: skip
    supervisor = Supervisor([*ingests, worker, beat]).start()
    uploads = Uploads(
        agents, [cut_agent], faulty, seed=plan.seed, period_s=0.05 if plan.full else 0.1
    ).start()
    seen = {"stored": 0}

    def stored() -> int:
        try:
            with psycopg.connect(f"{pg}/{fleet}", connect_timeout=2) as c:
                n = c.execute("SELECT count(*) FROM samples WHERE fleet = %s", (fleet,))
                seen["stored"] = n.fetchone()[0] - len(seeded)
        except psycopg.Error:
            pass  # down right now: the last count stands
        return seen["stored"]

    def more_stored(n: int, timeout: float = 120) -> None:
        target = stored() + n
        wait(lambda: stored() >= target, timeout, f"{n} more stored")

    def round_row() -> Round | None:
        with sessions() as s:
            return s.scalars(select(Round).where(Round.fleet == fleet, Round.version == "v2")
                             ).first()  # fmt: skip

    def wait(predicate, timeout, what, tick=None) -> None:
        try:
            wait_for(predicate, timeout, tick, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs(logdir)}") from None

    t_start = time.monotonic()
    try:
        # Every cloud process up and connected before the first fault: the faults hit
        # running services at the seeded points, not a start-up that happens to race them.
        mqtt = svc.ports["mosquitto"]
        wait(lambda: all(connected(p.proc.pid, mqtt) for p in ingests if p.proc), 60,
             "the ingests connected")  # fmt: skip
        wait(lambda: worker.proc is not None and connected(worker.proc.pid, svc.ports["redis"]),
             60, "the worker connected")  # fmt: skip
        # Execute 1: the services restarted in turn, devices uploading.
        for service, after, down in plan.restarts:
            more_stored(after)
            took = svc.restart(service, down)
            table.faults.append(f"restart {service} after {after} more samples stored "
                                f"(unreachable {took:.1f} s)")  # fmt: skip
        # Execute 2: an ingest SIGKILLed while it stores, restarted under its client id.
        for k, (after, delay, down) in enumerate(plan.ingest_kills):
            more_stored(after)
            time.sleep(delay)
            victim = ingests[k % 2]
            victim.kill()
            table.faults.append(f"SIGKILL {victim.name} {delay} s after {after} more stored; "
                                f"restarted {down} s later")  # fmt: skip
            time.sleep(down)
            victim.start()
        # Execute 2b: the agent in its own process SIGKILLed, started on the same state.
        for after, delay, down in plan.agent_kills:
            more_stored(after)
            time.sleep(delay)
            device.kill()
            table.faults.append(f"SIGKILL the agent {killable} {delay} s after {after} more "
                                f"stored; restarted {down} s later")  # fmt: skip
            time.sleep(down)
            device.start()
        more_stored(20)

        # Execute 3: a round on the worker, the worker SIGKILLed, PostgreSQL, Redis and S3
        # restarted under the second one.
        # The cut device asks for one chunk at a time; the link goes when it has made
        # a seeded share of the package's chunks durable (at least the first, never the last).
        n_chunks = -(-len(v1) // (64 << 10))
        cut_at_chunk = min(n_chunks - 1, max(1, round(plan.cut_fraction * n_chunks)))
        proxy.arm(lambda: held_chunks(tmp_path / updater) >= cut_at_chunk)
        out = subprocess.run([sys.executable, "-c", "from cloud.tasks import retrain; "
                              f"print(retrain.delay('{fleet}').id)"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]

        def training() -> bool:
            row = round_row()
            return row is not None and "progress" in (row.stages or {}).get("train", {})

        wait(training, 180, what="the round's training")
        time.sleep(plan.worker_kill_delay_s)
        stage_at_kill = round_row().state
        worker.kill()
        table.faults.append(f"SIGKILL the worker {plan.worker_kill_delay_s} s into the round's "
                            f"training (stage {stage_at_kill})")  # fmt: skip
        worker.start()
        killed_at = round_row().updated_at
        wait(lambda: round_row().updated_at != killed_at or round_row().state == "done",
                 120, what="the second worker to take the round")  # fmt: skip
        time.sleep(plan.redis_restart_delay_s)
        # PostgreSQL, Redis and S3 restarted in turn under the round (its stages wait
        # outages out: cloud.learn.runner, cloud.tasks.rounds).
        under_round = {}
        for service in ("postgres", "redis", "seaweedfs"):
            under_round[service] = stage = round_row().state
            took = svc.restart(service, 1.0)
            table.faults.append(f"restart {service} while the second worker runs the round "
                                f"(stage {stage}; unreachable {took:.1f} s)")  # fmt: skip
        wait(lambda: round_row().state in ("done", "failed"), 300,
                 what="the round to end")  # fmt: skip
        done = round_row()
        assert done.state == "done", f"{done.state}: {done.result}"
        assert "done" not in under_round.values(), f"a restart missed the round: {under_round}"

        # Execute 4: v2 rolls out; beat SIGKILLed; one device cut off mid-transfer.
        client = MlflowClient(tracking_uri=mlflow_uri)
        name = model_name(fleet, PROFILE)
        promoted = bool(done.result.get("promoted"))
        if not promoted:  # its gates failed: the operator moves champion, as in the UI
            with sessions() as s:
                mv = s.scalars(select(ModelVersion).where(ModelVersion.version == "v2")).one()
            client.set_registered_model_alias(name, "champion", mv.mlflow_version)

        def rollout_v2() -> Rollout | None:
            with sessions() as s:
                return s.scalars(
                    select(Rollout).where(Rollout.fleet == fleet, Rollout.target_version == "v2")
                ).first()

        wait(lambda: rollout_v2() is not None, 120, what="the v2 rollout")
        time.sleep(plan.beat_kill_delay_s)
        beat.kill()
        table.faults.append(f"SIGKILL beat {plan.beat_kill_delay_s} s into the v2 rollout")
        time.sleep(1.0)
        beat.start()
        under_rollout = []

        def restart_in_rollout(service: str, delay: float, down: float) -> None:
            time.sleep(delay)
            state, on = rollout_v2().state, sum(a.model_version == "v2" for a in every)
            under_rollout.append((service, state, on))
            took = svc.restart(service, down)
            table.faults.append(f"restart {service} {delay} s {point} (rollout {state}, {on} "
                                f"of the {len(every)} in-process devices on v2; unreachable "
                                f"{took:.1f} s)")  # fmt: skip

        # Mosquitto (the rollout's transport and every download's) restarted once the
        # first chunk of an update is on a device's disk: the offers are out.
        def chunk_arrived() -> bool:
            on_disk = any(p.stat().st_size > 0 for p in tmp_path.rglob("*.part"))
            return on_disk or any(a.model_version == "v2" for a in every)

        wait(chunk_arrived, 120, what="the first update chunk on a device")
        point = "after the first update chunk reached a device"
        restart_in_rollout("mosquitto", *plan.rollout_mqtt)
        wait(proxy.cut.is_set, 120, what="the cut device's download")
        time.sleep(0.5)  # what arrived before the cut is written by then
        parts = [p.stat().st_size for p in (tmp_path / updater).rglob("*.part")]
        table.faults.append(f"cut {updater} off with {cut_at_chunk} of {n_chunks} chunks held "
                            f"({proxy.received} bytes had reached it; the package is {len(v1)} "
                            f"bytes; on disk: {parts}); back "
                            f"{{back:.1f}} s later")  # fmt: skip
        # PostgreSQL (where the controller records waves and device updates) restarted
        # while the cut device is off its link: the rollout cannot be done.
        cut_at, point = time.monotonic(), "into the cut"
        restart_in_rollout("postgres", *plan.rollout_pg)
        time.sleep(max(0.0, plan.cut_s - (time.monotonic() - cut_at)))
        proxy.start()
        cut_fault = next(i for i, f in enumerate(table.faults) if f.startswith("cut "))
        table.faults[cut_fault] = table.faults[cut_fault].format(back=time.monotonic() - cut_at)
        wait(lambda: all(a.model_version == "v2" for a in every), 240,
                 what="v2 on every device")  # fmt: skip
        wait(lambda: rollout_v2().state == "done", 120, what="the rollout done")

        # Drain: the devices stop selecting; everything they buffered is acked.
        uploads.stop()
        assert device.proc is not None
        device.proc.terminate()  # it stops selecting and exits once all it buffered is acked
        for a in every:
            a.sync()
        wait(
            lambda: all(a.backlog() == 0 for a in every),
            180,
            "buffers drained",
            tick=lambda: [a.tick() for a in every],
        )
        assert device.proc.wait(180) == 0, logs(logdir)
    finally:
        uploads.stop()
        supervisor.stop()
        for p in (*ingests, worker, beat, device):
            p.stop()
        for a in every:
            a.stop()
        proxy.stop()
    wall = time.monotonic() - t_start

    # Assert: read everything back.
    durable, in_doubt = read_ledger(ledger)
    acc = account(sessions, store, fleet,
                  {**uploads.sent, **{m: (killable, sha) for m, sha in durable.items()}},
                  seeded, {m: (killable, sha) for m, sha in in_doubt.items()})  # fmt: skip
    on_killable = json.loads(status.read_text())
    with sessions() as s:
        versions = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        rounds_done = s.scalars(select(Round).where(Round.fleet == fleet, Round.state == "done"))
        rounds_done = len(list(rounds_done))
        rollouts = list(s.scalars(select(Rollout).where(Rollout.fleet == fleet)))
    registered = client.search_model_versions(f"name = '{name}'")
    by_version = {v.tags.get("edgeloop_version"): v for v in registered}
    half = [v.version for v in versions
            if not store.exists(v.object_key)
            or ModelPackage(store.get(v.object_key)).sha256 != v.sha256
            or by_version.get(v.version) is None
            or by_version[v.version].tags.get("sha256") != v.sha256]  # fmt: skip
    half += [v for v in by_version if v not in {m.version for m in versions}]
    v2 = next(v for v in versions if v.version == "v2")
    on_v2 = sum(a.runtime.package.sha256 == v2.sha256 for a in every)
    on_v2 += on_killable.get("sha256") == v2.sha256
    table.rows.update({
        "devices uploading (in this process + SIGKILLed process) / updating": (
            f"{len(agents)} + 1 / 1"),
        "samples sent (selected, message ids)": acc.sent,
        "samples stored (row + object, content hash checked)": acc.stored,
        "samples lost": len(acc.lost),
        "samples duplicated": len(acc.duplicated),
        "objects read back": acc.objects,
        "windows in doubt at an agent kill (stored / not, never durable)": (
            f"{acc.doubt_stored} / {len(in_doubt) - acc.doubt_stored}"),
        "rounds completed (after round 0)": rounds_done - 1,
        "v2 promoted by": "its gates" if promoted else "the operator (gates failed)",
        "rollouts completed": f"{sum(r.state == 'done' for r in rollouts)} of {len(rollouts)}",
        "model versions half-registered": len(half),
        "devices on v2's exact bytes": (
            f"{on_v2} of {len(every) + 1}"),
        "processes that exited on their own (restarted by the supervisor)": (
            ", ".join(f"{k} ×{n}" for k, n in supervisor.exits.items()) or "none"),
        "wall time of the faults phase": f"{wall:.0f} s",
    })  # fmt: skip
    assert parts and 0 < sum(parts) < len(v1), f"the cut was not mid-download: {parts}"
    assert all(st != "done" and on < len(every) for _, st, on in under_rollout), (
        f"a restart missed the rollout: {under_rollout}"
    )
    assert acc.sent > 0 and acc.stored == acc.sent
    assert acc.lost == [], acc.lost[:10]
    assert acc.duplicated == [], acc.duplicated[:10]
    assert [v.version for v in versions] == ["v1", "v2"] and half == []
    assert all(a.runtime.package.sha256 == v2.sha256 for a in every)
    assert on_killable == {"version": "v2", "sha256": v2.sha256}
    assert rounds_done == 2 and any(r.state == "done" and r.target_version == "v2"
                                    for r in rollouts)  # fmt: skip


def test_a_round_survives_a_postgres_restart(private_services, tep_small, mlflow_uri, tmp_path):
    """PostgreSQL restarted (down 5 s) while a round trains on a Celery worker: the round
    still ends done by itself, as the ingest and the rollout ride out the same restart."""
    svc = private_services
    fleet, _, url, sessions, store, registry = new_fleet(svc, mlflow_uri)
    # v1 trained briefly: this round needs only to run, not to pass its gates.
    seed_fleet(sessions, store, registry, fleet, tep_small, [f"{fleet}-a", f"{fleet}-b"],
               epochs=2)  # fmt: skip
    logdir = tmp_path / "logs"
    logdir.mkdir()
    env = cloud_env(svc, url, store, mlflow_uri, fleet, tmp_path / "keys")
    worker = Proc("worker", ["-m", "celery", "-A", "cloud.tasks", "worker", "-Q", f"q-{fleet}",
                             "--pool", "threads", "--concurrency", "2", "--loglevel", "INFO",
                             "--hostname", f"w-{fleet}@%h"], env, logdir).start()  # fmt: skip

    def state() -> tuple[str, dict] | None:
        with sessions() as s:
            row = s.scalars(select(Round).where(Round.fleet == fleet, Round.version == "v2"))
            row = row.first()
            return None if row is None else (row.state, row.stages or {})

    try:
        out = subprocess.run([sys.executable, "-c", "from cloud.tasks import retrain; "
                              f"print(retrain.delay('{fleet}').id)"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for(lambda: (st := state()) is not None and "progress" in st[1].get("train", {}),
                 180, what="the round's training")  # fmt: skip
        svc.restart("postgres", 5.0)  # longer than an epoch: a progress write meets it

        def ended() -> bool:
            text = "".join(p.read_text(errors="replace") for p in logdir.glob("*.log"))
            failed = "raised unexpected" in text  # the stage task gave up
            return failed or (state() or ("", {}))[0] in ("done", "failed")

        wait_for(ended, 240, what="the round to end or its stage task to fail")
        # A retry, if any, would start the stage again and finish within this.
        wait_for(lambda: state()[0] == "done", 20, what="the round done")
    finally:
        worker.stop()
