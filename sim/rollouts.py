"""The demo's rollouts, in its one process: what the webhook receiver, a Celery worker and
beat do in production — a promoted round's champion becomes a rollout, signed, offered over
MQTT and stepped wave by wave until it ends — with the same controller, signer and
transport."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cloud.config import CloudSettings
from cloud.rollout.controller import FINISHED, advance, start_rollout
from cloud.rollout.deltas import transfers
from cloud.rollout.signing import ReleaseSigner, init_fleet_trust
from cloud.rollout.transport import RolloutTransport
from cloud.store.db import Rollout
from cloud.store.objects import ObjectStore


class DemoRollouts:
    def __init__(
        self,
        *,
        settings: CloudSettings,
        sessions,
        store: ObjectStore,
        fleet: str,
        home: Path,
        mqtt_port: int,
    ) -> None:
        self.settings, self.sessions, self.store, self.fleet = settings, sessions, store, fleet
        keys = home / "keys"
        # The root and targets keys would go offline with an operator; here they stay in
        # the demo's home, which the next run deletes.
        self.root = init_fleet_trust(
            store=store, fleet=fleet, keys_dir=keys, offline_dir=home / "offline-keys"
        )
        self.signer = ReleaseSigner(store=store, fleet=fleet, keys_dir=keys)
        # The embedded broker has no shared subscriptions: a plain one.
        self.transport = RolloutTransport(
            host="127.0.0.1", port=mqtt_port, store=store, shared_group=""
        )

    def start(self) -> DemoRollouts:
        self.transport.start()
        if not self.transport.ready.wait(10):
            raise RuntimeError("the rollout transport did not connect to the broker")
        return self

    def stop(self) -> None:
        self.transport.stop()

    def roll_out(
        self, *, profile: str, mlflow_version: str, tick: Callable[[], None], timeout_s: float
    ) -> Rollout:
        """Move the fleet to ``mlflow_version`` (the new champion) and step the rollout,
        ticking the agents meanwhile, until it is done, aborted or superseded."""
        row = start_rollout(
            sessions=self.sessions,
            fleet=self.fleet,
            profile=profile,
            mlflow_version=mlflow_version,
            settings=self.settings,
        )
        deadline = time.monotonic() + timeout_s
        state = row.state
        while state not in FINISHED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {row.id} still {state} after {timeout_s:.0f} s")
            state = advance(
                sessions=self.sessions,
                store=self.store,
                signer=self.signer,
                transport=self.transport,
                rollout_id=row.id,
            )
            tick()
            time.sleep(0.2)
        with self.sessions() as session:
            return session.get(Rollout, row.id)

    def bytes_per_device(self, rollout_id: int) -> tuple[float, float]:
        """What the rollout's devices received on average, and what the whole package
        would have been (read back from their update reports)."""
        with self.sessions() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None:
                return 0.0, 0.0
            table, totals = transfers(session, rollout)
        n = sum(1 for got in table.get("received_bytes", []) if got is not None)
        return totals["bytes_received"] / max(1, n), totals["bytes_full"] / max(1, n)
