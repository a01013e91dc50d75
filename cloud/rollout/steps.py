"""One step of a rollout on its locked row: plan the waves, send a wave, wait for its
statuses, dwell, judge, roll back. The controller (cloud.rollout.controller) calls it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.rollout.deltas import delta_assignments, delta_of
from cloud.rollout.fleet import label_counts
from cloud.rollout.health import (
    FAILED_STATES,
    GONE,
    LEFT,
    SILENT,
    DeviceHealth,
    install_failures,
    judge,
    left_out,
    link_refusal,
)
from cloud.rollout.settings import RolloutSettings, budget_of, lock_fleet
from cloud.rollout.signing import Assignment
from cloud.rollout.waves import plan_waves
from cloud.store.db import Device, DeviceUpdate, ModelVersion, Rollout, aware
from cloud.store.objects import ObjectStore
from shared.errors import EdgeloopError
from shared.messages import PayloadKind
from shared.package import model_name

log = logging.getLogger(__name__)

INSTALL_BEATS = "beats_at_install"  # in DeviceUpdate.before: the heartbeat count at install
KEEPS = "keeps "  # how the reason of a canary without a previous model starts after an abort


def _left_out(u: DeviceUpdate) -> bool:
    return left_out(wave=u.wave, state=u.state, reason=u.reason)


class Signer(Protocol):
    def publish(self, assignments: Sequence[Assignment]) -> int: ...
    def current_release(self) -> int: ...
    def assignments(self) -> list[Assignment]: ...
    def bundle(self) -> dict[str, str]: ...


class Transport(Protocol):
    def offer(self, *, fleet: str, device_id: str, release: int, target_path: str,
              length: int, bundle: dict[str, str], url: str | None = None,
              payload_kind: PayloadKind = "package") -> None: ...  # fmt: skip
    def target_url(self, fleet: str, target: str) -> str | None: ...


class Step:
    """One step's work on one locked rollout row (the caller commits)."""

    def __init__(self, session: Session, store: ObjectStore, signer: Signer,
                 transport: Transport, r: Rollout, now: datetime) -> None:  # fmt: skip
        self.session, self.store, self.signer, self.transport = session, store, signer, transport
        self.r, self.now = r, now
        self.cfg = RolloutSettings(**r.params["settings"])

    # -- rows and devices ---------------------------------------------------------------
    def rows(self, waves: range | None = None) -> list[DeviceUpdate]:
        q = select(DeviceUpdate).where(DeviceUpdate.rollout_id == self.r.id)
        rows = self.session.scalars(q.order_by(DeviceUpdate.device_id)).all()
        if waves is None:
            return list(rows)
        wanted = {d for k in waves for d in self.r.plan[k]}
        return [u for u in rows if u.device_id in wanted]

    def devices(self) -> dict[str, Device]:
        q = select(Device).where(Device.fleet == self.r.fleet, Device.profile == self.r.profile)
        return {d.id: d for d in self.session.scalars(q)}

    def plan(self) -> None:
        """Waves and a row per device of the profile (those already on the target
        installed), unless an earlier rollout of the profile is still rolling back."""
        busy = self.session.scalar(
            select(Rollout.id).where(
                Rollout.fleet == self.r.fleet,
                Rollout.profile == self.r.profile,
                Rollout.state == "rolling_back",
                Rollout.id != self.r.id,
            )
        )
        if busy is not None:
            return
        devices = self.devices()
        need = [
            (d.id, d.site) for d in devices.values() if d.model_version != self.r.target_version
        ]
        waves = plan_waves(
            devices=need,
            profile_devices=len(devices),
            policy=self.cfg.waves,
            seed=f"r{self.r.id}",
            online={d.id for d in devices.values() if d.online},
        )
        for k, wave in enumerate(waves):
            for device_id in wave:
                self.session.add(self._row(devices[device_id], k, "pending"))
        for d in devices.values():
            if d.model_version == self.r.target_version:
                row = self._row(d, 0, "installed")
                row.installed_at, row.reason = self.now, "already on the target"
                self.session.add(row)
        self.r.plan, self.r.wave, self.r.state = waves, 0, "wave"
        if not waves:
            self.finish("done", "every device already runs the target")

    def _row(self, d: Device, wave: int, state: str) -> DeviceUpdate:
        return DeviceUpdate(
            rollout_id=self.r.id,
            device_id=d.id,
            target_version=self.r.target_version,
            base_version=d.model_version,
            state=state,
            wave=wave,
        )

    def finish(self, state: str, reason: str = "") -> None:
        self.r.state, self.r.finished_at = state, self.now
        if reason:
            self.r.reason = reason

    # -- releases and offers ----------------------------------------------------------------
    def publish(self, assign: dict[str, str], *, make_deltas: bool = True) -> int:
        """Sign the release giving the profile's devices in ``assign`` those versions, every
        other device of the profile the version it runs, other profiles what they have."""
        fleet_row = lock_fleet(self.session, self.r.fleet)
        devices = self.devices()
        wanted = {i: v for i, d in devices.items() if (v := assign.get(i, d.model_version))}
        by_version: dict[str, list[str]] = {}
        for device_id, version in wanted.items():
            by_version.setdefault(version, []).append(device_id)
        out = [a for a in self.signer.assignments() if a.profile != self.r.profile]
        out += delta_assignments(session=self.session, store=self.store, fleet=self.r.fleet,
                                 profile=self.r.profile, devices=devices, assign=wanted,
                                 version=self.version, make=make_deltas)  # fmt: skip
        for version, ids in sorted(by_version.items()):
            target = self.target(version)
            if target is None:
                log.warning("rollout %d: %s not registered; %s keep what they have",
                            self.r.id, version, ", ".join(ids))  # fmt: skip
                continue
            out.append(Assignment(**{**asdict(target), "devices": tuple(sorted(ids))}))
        release = self.signer.publish(out)
        fleet_row.release = self.r.release = release
        return release

    def version(self, version: str) -> ModelVersion | None:
        return self.session.scalar(
            select(ModelVersion).where(
                ModelVersion.name == model_name(self.r.fleet, self.r.profile),
                ModelVersion.version == version,
            )
        )

    def target(self, version: str) -> Assignment | None:
        mv = self.version(version)
        if mv is None:
            return None
        return Assignment(
            path=f"{self.r.profile}/{version}.edgepkg",
            sha256=mv.sha256,
            length=_length(self.store, mv.object_key, mv.sha256),
            fleet=self.r.fleet,
            profile=self.r.profile,
            version=version,
            devices=(),
        )

    def offer(self, rows: list[DeviceUpdate], version_of: dict[str, str]) -> list[DeviceUpdate]:
        """Offer the current release to each row's device; the rows the broker took. The
        current one, not this rollout's last: another profile's rollout may have signed a
        newer release since (which keeps this profile's assignments), and a device drops an
        offer older than what it has seen."""
        if not rows:
            return []
        release, bundle, sent = self.signer.current_release(), self.signer.bundle(), []
        signed = self.signer.assignments()
        for u in rows:
            target = self.target(version_of[u.device_id])
            if target is None:
                continue
            # The device's delta where the release signs one for it, else the package.
            target = delta_of(signed, u.device_id, target.version) or target
            try:
                self.transport.offer(
                    fleet=self.r.fleet,
                    device_id=u.device_id,
                    release=release,
                    target_path=target.path,
                    length=target.length,
                    payload_kind="delta" if target.kind == "delta" else "package",
                    bundle=bundle,
                    # Devices that reach object storage fetch it there (and fill any gap
                    # over MQTT); the others ignore the URL.
                    url=self.transport.target_url(self.r.fleet, target.path)
                    if self.cfg.presigned_urls
                    else None,
                )
            except EdgeloopError as exc:  # offered again next step
                log.warning("rollout %d: offer to %s failed: %s", self.r.id, u.device_id, exc)
                continue
            u.sent_at = self.now
            if target.version == u.target_version:  # a rollback's offer keeps the forward's
                u.payload, u.payload_bytes = target.kind, target.length
            sent.append(u)
        return sent

    def due(self, u: DeviceUpdate) -> bool:
        return u.sent_at is None or self.now - aware(u.sent_at) >= timedelta(
            seconds=self.cfg.resend_s
        )

    # -- forward ------------------------------------------------------------------------------
    def wave(self) -> None:
        """Send wave k, wait for its statuses, dwell, judge; next wave, done or roll back.
        Every judgement also counts the install failures of waves 0..k-1 (a canary that
        rolls itself back after its wave was judged aborts the wave dwelling now)."""
        r, k = self.r, self.r.wave
        sent_so_far = self.rows(range(0, k + 1))
        devices = self.devices()
        self.drop_gone(sent_so_far, devices)
        wave = set(r.plan[k])
        rows = [u for u in sent_so_far if u.device_id in wave]
        earlier = [u for u in sent_so_far if u not in rows]
        target = {u.device_id: r.target_version for u in sent_so_far}
        pending = [u for u in rows if u.state == "pending"]
        if pending:
            self.publish({d: r.target_version for w in r.plan[: k + 1] for d in w})
            for u in self.offer(pending, target):
                u.state = "sent"
                u.before = dict(devices[u.device_id].health or {})
            r.wave_started_at = r.wave_started_at or self.now
            return
        again = [u for u in rows if u.state == "sent" or link_refusal(u.state, u.reason) and k]
        self.offer([u for u in again if self.due(u)], target)
        for u in rows:
            d = devices.get(u.device_id)
            if u.state != "installed" or d is None or d.model_version != r.target_version:
                continue
            beats = int((d.health or {}).get("beats", 0))
            if INSTALL_BEATS not in (u.before or {}):
                u.before = {**(u.before or {}), INSTALL_BEATS: beats}
            u.beats_after = beats - int(u.before[INSTALL_BEATS])
        if self.now - aware(r.wave_started_at or self.now) > timedelta(
            seconds=self.cfg.wave_timeout_s
        ):
            # A device that never answers, or never heartbeats on the target, is failed. In
            # the canary wave that aborts (a silent canary cannot be judged healthy); in a
            # later wave it is left out of the judgement, so one device offline does not
            # roll back a fleet whose canaries were healthy.
            for u in rows:
                if u.state == "sent":
                    u.state = "failed"
                    u.reason = f"{SILENT}no status in {self.cfg.wave_timeout_s:g} s"
                elif u.state == "installed" and u.beats_after < self.cfg.dwell_heartbeats:
                    u.state = "failed"
                    u.reason = f"{SILENT}{u.beats_after} heartbeat(s) on the target in time"
        rows = [u for u in rows if not _left_out(u)]
        observed = self.observe(rows, devices) + self.observe(
            [u for u in earlier if not _left_out(u) and u.state in FAILED_STATES], devices
        )
        failures = install_failures(observed)
        dwelt = all(o.after is not None for o in observed)
        if not failures and not dwelt:
            return  # still waiting
        verdict = judge(
            devices=observed,
            budget=budget_of(r.profile),
            thresholds=self.cfg.thresholds,
            labels=label_counts(self.session, rows, r.target_version),
        )
        r.health = {"wave": k, **verdict.to_dict()}
        if verdict.abort:
            r.state, r.wave_started_at = "rolling_back", self.now
            r.reason = f"wave {k}: " + "; ".join(verdict.reasons)
            log.warning("rollout %d aborts: %s", r.id, r.reason)
        elif k + 1 < len(r.plan):
            r.wave, r.wave_started_at = k + 1, None
            self.wave()  # send the next wave in the same step
        else:
            self.finish("done")

    def drop_gone(self, rows: list[DeviceUpdate], devices: dict[str, Device]) -> None:
        """Fail, and leave out from now on, the rows still in play whose device has left
        the profile (re-enrolled with another) or was deleted."""
        for u in rows:
            if u.device_id in devices or u.state not in ("pending", "sent", "installed"):
                continue
            u.state = "failed"
            u.reason = LEFT if self.session.get(Device, u.device_id) is not None else GONE

    def observe(self, rows: list[DeviceUpdate], devices: dict[str, Device]) -> list[DeviceHealth]:
        out = []
        for u in rows:
            before = {k: v for k, v in (u.before or {}).items() if k != INSTALL_BEATS}
            d = devices.get(u.device_id)
            dwelt = u.state == "installed" and u.beats_after >= self.cfg.dwell_heartbeats
            after = dict(d.health or {}) if dwelt and d is not None else None
            out.append(DeviceHealth(u.device_id, u.state, u.reason, before, after))
        return out

    # -- back ---------------------------------------------------------------------------------
    def roll_back(self) -> None:
        """Publish the release giving every device the rollout reached its previous version;
        offer it until each reports running it (then rolled_back), or the wave timeout.
        A device that had no model before (the first model of a fleet) cannot be given
        "none": its row is failed, named in the rollout's reason, never counted back."""
        r = self.r
        reached = [u for u in self.rows(range(0, r.wave + 1)) if u.sent_at is not None]
        previous = {u.device_id: u.base_version for u in reached if u.base_version}
        release = self.publish(previous, make_deltas=False)  # an abort waits for no encoding
        devices = self.devices()
        left = []
        for u in reached:
            d = devices.get(u.device_id)
            if d is None or u.state == "rolled_back":
                continue
            if u.device_id not in previous:  # it had no model before
                if d.model_version == r.target_version or u.state == "installed":
                    u.state = "failed"
                    u.reason = (f"{KEEPS}{r.target_version}: it had no previous model to go "
                                "back to; take it out of service")  # fmt: skip
                elif u.state == "sent":  # never installed: the abort's release assigns it none
                    u.state = "failed"
                    u.reason = "no previous model; aborted before it installed the target"
                continue
            seen = (d.health or {}).get("release")
            if seen is None:  # an agent that does not say which release it has seen
                seen = release
            if d.model_version == u.base_version and seen >= release:
                if u.state in ("sent", "installed"):
                    u.state = "rolled_back"
                    u.reason = f"back on {u.base_version} (release {release})"
            else:
                left.append(u)
        started = aware(r.wave_started_at or self.now)
        self.offer([u for u in left if aware(u.sent_at or started) < started or self.due(u)],
                   previous)  # fmt: skip
        kept = sorted(u.device_id for u in reached if (u.reason or "").startswith(KEEPS))
        why = r.reason or ""
        if kept:
            why += (f"; keep {r.target_version}, having no previous model (take them out "
                    f"of service): {', '.join(kept)}")  # fmt: skip
        if not left:
            self.finish("aborted", why)
        elif self.now - started > timedelta(seconds=self.cfg.wave_timeout_s):
            ids = ", ".join(u.device_id for u in left)
            self.finish("aborted", f"{why}; not confirmed back on the previous model: {ids}")


_LENGTHS: dict[str, int] = {}  # sha256 → bytes: content-addressed, so never stale


def _length(store: ObjectStore, key: str, sha256: str) -> int:
    if sha256 not in _LENGTHS:
        _LENGTHS[sha256] = len(store.get(key))
    return _LENGTHS[sha256]
