"""The cohort plan of a rollout: which devices go in which wave, canaries first (online
ones, spread across sites), the same plan for the same devices and seed."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from shared.errors import ConfigError


@dataclass(frozen=True)
class WavePolicy:
    canary_min_devices: int = 5
    canary_share: float = 0.05
    growth: float = 2.0

    def check(self) -> None:
        if self.canary_min_devices < 1:
            raise ConfigError("rollout_canary_min_devices must be at least 1")
        if not 0 <= self.canary_share <= 1:
            raise ConfigError("rollout_canary_share must lie in [0, 1]")
        if self.growth < 1:
            raise ConfigError("rollout_wave_growth must be at least 1 (waves never shrink)")


def canary_size(policy: WavePolicy, profile_devices: int) -> int:
    """The larger of the minimum and the share of all the profile's devices (rounded up)."""
    return max(policy.canary_min_devices, math.ceil(policy.canary_share * profile_devices))


def site_order(devices: Iterable[tuple[str, str | None]], seed: str) -> list[str]:
    """Device ids ordered round-robin by site: one from each site in turn, sites and the
    devices within each shuffled by ``seed``, so any prefix is spread across sites."""
    by_site: dict[str, list[str]] = {}
    for device_id, site in devices:
        by_site.setdefault(site or "", []).append(device_id)
    sites = sorted(by_site)
    random.Random(f"{seed}/sites").shuffle(sites)
    queues = []
    for site in sites:
        ids = sorted(by_site[site])
        random.Random(f"{seed}/{site}").shuffle(ids)
        queues.append(ids)
    out: list[str] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def plan_waves(
    *,
    devices: Iterable[tuple[str, str | None]],
    profile_devices: int,
    policy: WavePolicy,
    seed: str,
    online: Collection[str] = (),
) -> list[list[str]]:
    """Waves of the ``devices`` (id, site) that need the target: the canary cohort, then
    the rest in waves of canaries × growth, × growth², … (the last takes what is left).

    Canaries are taken from the ``online`` devices first (spread across their sites), and
    from the offline ones only when too few are online: a canary that cannot hear the
    offer fails the canary wave at its timeout. ``profile_devices`` counts every device of
    the profile, those already on the target too: the canary share is of the profile."""
    policy.check()
    devices = list(devices)
    order = site_order(devices, seed)
    if not order:
        return []
    size = canary_size(policy, profile_devices)
    up = set(online)
    canaries = site_order([d for d in devices if d[0] in up], seed)[:size]
    if len(canaries) < size:
        down = [d for d in devices if d[0] not in up]
        canaries += site_order(down, seed)[: size - len(canaries)]
    taken = set(canaries)
    rest = [d for d in order if d not in taken]
    waves = [canaries]
    at, k = 0, 1
    while at < len(rest):
        n = max(1, math.ceil(size * policy.growth**k))
        waves.append(rest[at : at + n])
        at, k = at + n, k + 1
    return waves
