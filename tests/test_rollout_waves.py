"""The cohort plan: canary size, spread across sites, growing waves, determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from cloud.rollout.waves import WavePolicy, canary_size, plan_waves
from shared.errors import ConfigError


def fleet_of(n: int, sites: int) -> list[tuple[str, str | None]]:
    return [(f"d{i:03d}", f"site{i % sites}") for i in range(n)]


def test_canary_is_the_larger_of_the_minimum_and_the_share():
    """5 devices below 100 devices, 5% above."""
    policy = WavePolicy(canary_min_devices=5, canary_share=0.05)

    assert canary_size(policy, 20) == 5
    assert canary_size(policy, 100) == 5
    assert canary_size(policy, 300) == 15
    assert canary_size(policy, 301) == 16  # rounded up


def test_waves_grow_and_cover_every_device_once():
    """Canaries, then ×2, ×4 … of the canary size; every device in exactly one wave."""
    devices = fleet_of(100, 4)

    waves = plan_waves(devices=devices, profile_devices=100, policy=WavePolicy(), seed="r1")

    assert [len(w) for w in waves] == [5, 10, 20, 40, 25]
    flat = [d for w in waves for d in w]
    assert sorted(flat) == sorted(d for d, _ in devices)


def test_canaries_spread_across_sites():
    """Five canaries from five sites of twenty devices each: one per site."""
    devices = fleet_of(100, 5)
    site = dict(devices)

    canaries = plan_waves(devices=devices, profile_devices=100, policy=WavePolicy(), seed="r7")[0]

    assert Counter(site[d] for d in canaries) == {f"site{i}": 1 for i in range(5)}


def test_canaries_are_online_devices_spread_across_sites():
    """Of 60 devices over three sites, 4 online at each: the five canaries are online and
    from all three sites; with only two online, those two and three offline ones."""
    devices = fleet_of(60, 3)
    site = dict(devices)
    online = {d for d, _ in devices[:12]}

    canaries = plan_waves(devices=devices, profile_devices=60, policy=WavePolicy(), seed="r3",
                          online=online)[0]  # fmt: skip
    few = plan_waves(devices=devices, profile_devices=60, policy=WavePolicy(), seed="r3",
                     online={"d007", "d031"})  # fmt: skip

    assert set(canaries) <= online and len(canaries) == 5
    assert set(Counter(site[d] for d in canaries)) == {"site0", "site1", "site2"}
    assert len(few[0]) == 5 and {"d007", "d031"} <= set(few[0])
    assert sorted(d for w in few for d in w) == sorted(d for d, _ in devices)


def test_plan_is_deterministic_by_seed():
    """The same devices and seed give the same plan whatever their order; another seed another."""
    devices = fleet_of(40, 3)

    a = plan_waves(devices=devices, profile_devices=40, policy=WavePolicy(), seed="r1")
    b = plan_waves(devices=devices[::-1], profile_devices=40, policy=WavePolicy(), seed="r1")
    c = plan_waves(devices=devices, profile_devices=40, policy=WavePolicy(), seed="r2")

    assert a == b
    assert a != c


def test_small_fleet_and_empty():
    """Fewer devices than the canary minimum: one wave; no device needing it: no wave."""
    small = plan_waves(devices=fleet_of(3, 1), profile_devices=3, policy=WavePolicy(), seed="s")
    empty = plan_waves(devices=[], profile_devices=10, policy=WavePolicy(), seed="s")

    assert [sorted(w) for w in small] == [["d000", "d001", "d002"]]
    assert empty == []


def test_bad_policy_is_refused():
    """A growth below 1 would shrink waves: a named configuration error."""
    with pytest.raises(ConfigError, match="growth"):
        plan_waves(
            devices=fleet_of(10, 1), profile_devices=10, policy=WavePolicy(growth=0.5), seed="s"
        )
