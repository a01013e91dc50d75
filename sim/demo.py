"""`edgeloop demo`: the whole loop on one machine with embedded defaults.

A model is trained on the initial TEP faults and packaged; edge agents run it on simulated
plants; uncertain and faulty windows go over MQTT (in-process broker) to the ingest, which
stores them (local object store + SQLite); ground truth follows later; each round retrains
with replay, registers the new version in MLflow (sqlite store) and sends it to the agents.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from cloud.config import CloudSettings
from cloud.ingest.ingestor import Ingestor
from cloud.ingest.service import IngestService
from cloud.learn.runner import run_round, train_initial
from cloud.learn.state import RoundConfig
from cloud.store.datasets import LabelledWindows, register_dataset
from cloud.store.db import migrate, session_factory
from cloud.store.objects import LocalObjectStore
from cloud.store.records import allow_classes, create_fleet, register_device
from cloud.tracking.registry import open_registry
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeSettings
from shared.errors import DataError
from sim.broker import EmbeddedBroker
from sim.fleet import FleetSimulator
from sim.rollouts import DemoRollouts
from sim.tep import NORMAL, VALIDATION_SEED, Windows, generate, golden_set

log = logging.getLogger(__name__)
DEFAULT_INITIAL = ("normal", "idv_01", "idv_02", "idv_07")
DEFAULT_NEW = ("idv_06", "idv_14")
PROFILE = "cpu-fp32"


@dataclass
class RoundRow:
    round: int
    new_fault: str
    version_before: str
    version_after: str
    promoted: bool
    windows: int
    uploaded: int
    labelled: int
    new_acc_before: float
    new_acc_after: float
    new_flagged_before: float  # share of new-fault windows flagged as some fault
    old_acc_before: float
    old_acc_after: float
    round_seconds: float
    update_bytes: float = 0.0  # what each device received for the update, on average
    package_bytes: float = 0.0  # …and what the whole package would have been


def _to_labelled(w: Windows) -> LabelledWindows:
    return LabelledWindows(w.x, np.array(w.class_names)[w.y], dict(w.meta))


def _wait(
    predicate: Callable[[], bool], tick: Callable[[], None], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        tick()
        time.sleep(0.1)


def _accuracy(pairs: list[tuple[str, str]], classes: set[str]) -> float:
    sel = [(p, t) for p, t in pairs if t in classes]
    return float(np.mean([p == t for p, t in sel])) if sel else float("nan")


def run_demo(
    *,
    home: Path,
    devices: int = 3,
    rounds: int | None = None,
    initial_faults: Sequence[str] = DEFAULT_INITIAL,
    new_faults: Sequence[str] = DEFAULT_NEW,
    seed: int = 0,
    workers: int = 2,
    horizon_h: float = 5.0,
    fleet: str = "demo",
    echo: Callable[[str], None] = print,
) -> list[RoundRow]:
    sim = FleetSimulator(
        devices=devices,
        initial_faults=list(initial_faults),
        new_faults=list(new_faults),
        horizon_h=horizon_h,
        seed=seed,
    )
    rounds = len(new_faults) if rounds is None else rounds
    if rounds < 1 or rounds > len(new_faults):
        raise DataError(
            f"rounds must be between 1 and the number of new faults "
            f"({len(new_faults)}), got {rounds}"
        )
    # MLflow configures its own logger on import; keep its INFO lines out of the demo's output.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    home = Path(home).resolve()
    cache = home / "cache"
    for child in home.glob("*") if home.exists() else []:  # a fresh loop; keep the data cache
        if child != cache:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    home.mkdir(parents=True, exist_ok=True)
    settings = CloudSettings(mode="embedded", home=home, store="local")
    sim.new_faults, sim.cache_dir = list(new_faults)[:rounds], cache

    echo(
        f"[1/4] Simulating the Tennessee Eastman plant: base set of {list(initial_faults)}, "
        f"golden set with {list(new_faults)[:rounds]} too"
    )
    t0 = time.perf_counter()
    base = generate(
        classes=list(initial_faults),
        runs_per_class=2,
        seed=seed,
        horizon_h=horizon_h,
        cache_dir=cache,
        workers=workers,
    )
    # Other episodes of the base classes: training keeps its best epoch on them.
    validation = generate(
        classes=list(initial_faults),
        runs_per_class=1,
        seed=VALIDATION_SEED,
        horizon_h=horizon_h,
        cache_dir=cache,
        workers=workers,
    )
    golden = golden_set(
        classes=[*initial_faults, *list(new_faults)[:rounds]],
        cache_dir=cache,
        horizon_h=horizon_h,
        workers=workers,
    )
    _prefetch(sim, rounds, workers)
    echo(
        f"      {len(base)} base, {len(validation)} validation and {len(golden)} golden windows "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    migrate(settings.resolved_database_url)
    sessions = session_factory(settings.resolved_database_url, settings)
    store = LocalObjectStore(home / "objects")
    registry = open_registry(settings, fleet)
    register_dataset(store=store, name="base", data=_to_labelled(base))
    register_dataset(store=store, name="validation", data=_to_labelled(validation))
    register_dataset(store=store, name="golden", data=_to_labelled(golden))
    cfg = RoundConfig(fleet=fleet, profile=PROFILE, seed=seed)

    echo("[2/4] Training the initial model and registering it in MLflow")
    first = train_initial(sessions=sessions, store=store, registry=registry, cfg=cfg)
    echo(
        f"      {first.version}: classes {first.class_names}, golden macro-F1 "
        f"{first.gates['golden_macro_f1']:.3f}"
    )

    echo(f"[3/4] Starting the in-process MQTT broker, the ingest and {devices} edge agents")
    broker = EmbeddedBroker().start()
    ingest = IngestService(
        Ingestor(sessions=sessions, store=store),
        host="127.0.0.1",
        port=broker.port,
        fleet=fleet,
        group=None,
    )
    ingest.start()
    with sessions() as session:  # devices may label what the first model knows
        create_fleet(session=session, fleet=fleet, classes=list(first.class_names))
    rollouts = DemoRollouts(
        settings=settings,
        sessions=sessions,
        store=store,
        fleet=fleet,
        home=home,
        mqtt_port=broker.port,
    ).start()
    agents: list[EdgeAgent] = []
    rows: list[RoundRow] = []
    try:
        ingest.ready.wait(10)
        for device_id in sim.device_ids:
            with sessions() as session:
                register_device(session=session, device_id=device_id, fleet=fleet, profile=PROFILE)
            agent = EdgeAgent(
                EdgeSettings(
                    fleet=fleet,
                    device_id=device_id,
                    profile=PROFILE,
                    mqtt_port=broker.port,
                    state_dir=home / "edge" / device_id,
                    uncertain_below=0.9,
                    resend_after_s=5,
                    heartbeat_s=1,  # the rollout dwells three heartbeats per wave
                    diversity_distance=0.2,
                )
            )
            agent.enroll(rollouts.root)  # the fleet's TUF root: what it trusts updates by
            agent.bootstrap(first.package)
            agent.start()
            agents.append(agent)
        _wait(
            lambda: all(a.link.connected.is_set() for a in agents),
            lambda: None,
            30,
            "the agents to connect",
        )
        for a in agents:
            a.heartbeat()

        version = first.version
        # The recorded history replays as if it had just happened: every round's plant
        # time in the past, the last ending now (ingest refuses the future and the old).
        plant_start = datetime.now(UTC) - timedelta(hours=rounds * sim.round_hours)
        echo(f"[4/4] Running {rounds} round(s) of the loop")
        for rnd in range(1, rounds + 1):
            t_round = time.perf_counter()
            new_fault = sim.new_faults[rnd - 1]
            with sessions() as session:  # the maintenance team names the new fault
                allow_classes(session=session, fleet=fleet, add=[new_fault])
            old = set(sim.faults_in_round(rnd - 1))
            before, uploaded, labelled = _stream(sim, agents, rnd, "stream", plant_start)
            _wait(
                lambda: all(a.backlog() == 0 for a in agents),
                lambda: [a.tick() for a in agents],
                120,
                "uploads and labels to be acked",
            )
            result = run_round(sessions=sessions, store=store, registry=registry, cfg=cfg)
            sent = (0.0, 0.0)
            if result.promoted:
                assert result.mlflow_version is not None  # a promoted version is registered
                rollout = rollouts.roll_out(
                    profile=PROFILE,
                    mlflow_version=result.mlflow_version,
                    tick=lambda: [a.tick() for a in agents],
                    timeout_s=300,
                )
                if rollout.state != "done":
                    raise RuntimeError(
                        f"rollout of {result.version} ended {rollout.state}: {rollout.reason}"
                    )
                sent = rollouts.bytes_per_device(rollout.id)
            after, _, _ = _stream(sim, agents, rnd, "eval", plant_start)
            row = RoundRow(
                round=rnd,
                new_fault=new_fault,
                version_before=version,
                version_after=result.version if result.promoted else version,
                promoted=result.promoted,
                windows=len(before),
                uploaded=uploaded,
                labelled=labelled,
                new_acc_before=_accuracy(before, {new_fault}),
                new_acc_after=_accuracy(after, {new_fault}),
                new_flagged_before=float(
                    np.mean([p != NORMAL for p, t in before if t == new_fault])
                ),
                old_acc_before=_accuracy(before, old),
                old_acc_after=_accuracy(after, old),
                round_seconds=time.perf_counter() - t_round,
                update_bytes=sent[0] if result.promoted else 0.0,
                package_bytes=sent[1] if result.promoted else 0.0,
            )
            rows.append(row)
            version = row.version_after
            echo(
                f"      round {rnd}: {new_fault} appeared; {uploaded} windows uploaded, "
                f"{labelled} labelled; {result.version} "
                f"{'promoted and rolled out' if result.promoted else 'held back by its gates'}"
                f" ({row.round_seconds:.0f} s)"
            )
        _wait(
            lambda: all(a.backlog() == 0 for a in agents),
            lambda: [a.tick() for a in agents],
            120,
            "the last uploads to be acked",
        )
        for a in agents:
            a.heartbeat()
        time.sleep(0.5)
    finally:
        for a in agents:
            a.stop()
        rollouts.stop()
        ingest.stop()
        broker.stop()
    echo("")
    echo(format_table(rows))
    echo(
        f"\nMLflow runs and registered versions: mlflow ui --backend-store-uri "
        f"{settings.resolved_mlflow_uri}"
    )
    return rows


def _prefetch(sim: FleetSimulator, rounds: int, workers: int) -> None:
    """Simulate every episode the rounds will stream, on all cores, into the cache."""
    episodes = {
        ep
        for d in range(sim.devices)
        for r in range(1, rounds + 1)
        for phase in ("stream", "eval")
        for ep in sim.schedule(d, r, phase=phase)
    }
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(sim.windows, sorted(episodes, key=lambda e: e.seed)))
    else:
        for ep in episodes:
            sim.windows(ep)


def _stream(
    sim: FleetSimulator, agents: list[EdgeAgent], rnd: int, phase: str, plant_start: datetime
) -> tuple[list[tuple[str, str]], int, int]:
    """Every device runs its round; in the 'stream' phase, uploaded windows get their ground
    truth afterwards, as a maintenance report would give it. Windows carry the plant time
    of their last sample (round ``rnd`` runs from ``plant_start`` + (rnd - 1) rounds), as a
    device stamps them: the rounds split hold-outs by time. Returns (prediction, truth)
    pairs, uploads and labelled windows."""
    start = plant_start + timedelta(hours=(rnd - 1) * sim.round_hours)

    def one(i: int) -> tuple[list[tuple[str, str]], int, int]:
        agent = agents[i]
        pairs, truth_of = [], defaultdict(list)
        for window, truth, at in sim.timed_stream(i, rnd, start=start, phase=phase):
            det, msg = agent.process(window, captured_at=at)
            pairs.append((det.predicted, truth))
            if msg is not None and phase == "stream":
                truth_of[truth].append(msg.message_id)
        for label, ids in truth_of.items():
            for k in range(0, len(ids), 1000):
                agent.report_label(ids[k : k + 1000], label)
        n = sum(len(v) for v in truth_of.values())
        return pairs, n, n

    with ThreadPoolExecutor(max_workers=len(agents)) as pool:
        parts = list(pool.map(one, range(len(agents))))
    return (
        [p for part in parts for p in part[0]],
        sum(p[1] for p in parts),
        sum(p[2] for p in parts),
    )


def format_table(rows: list[RoundRow]) -> str:
    head = (
        "round  new fault  model       uploads  new-fault acc  flagged  old-class acc  "
        "update KB per device"
        "\n                   before→after        before→after  before   before→after   "
        "(delta) of package"
    )
    lines = [head, "-" * 106]
    for r in rows:
        lines.append(
            f"{r.round:>5}  {r.new_fault:<9}  {r.version_before:>3}→{r.version_after:<3}"
            f"{'' if r.promoted else '(held)':6}  {r.uploaded:>7}  "
            f"{100 * r.new_acc_before:5.1f}%→{100 * r.new_acc_after:5.1f}%  "
            f"{100 * r.new_flagged_before:5.1f}%  "
            f"{100 * r.old_acc_before:5.1f}%→{100 * r.old_acc_after:5.1f}%  "
            + (
                f"{r.update_bytes / 1000:7.1f} of {r.package_bytes / 1000:.1f}"
                if r.package_bytes
                else f"{'-':>7}"
            )
        )
    return "\n".join(lines)
