"""The judgement of a wave: install failures, inference errors, budgets, the anomaly-rate
test stratified by device (against a hand-computed case) and labelled accuracy."""

from __future__ import annotations

import pytest

from cloud.rollout.health import (
    Budget,
    DeviceHealth,
    LabelCounts,
    Stratum,
    Thresholds,
    cmh,
    judge,
)


def beat(rate: float, windows: int = 100, **kw) -> dict:
    return {"anomaly_rate": rate, "recent_windows": windows, "latency_ms_p99": 2.0,
            "memory_mb": 80.0, "inference_errors": 0, **kw}  # fmt: skip


def healthy(n: int = 4, before: float = 0.05, after: float = 0.05) -> list[DeviceHealth]:
    return [
        DeviceHealth(f"d{i}", "installed", before=beat(before), after=beat(after)) for i in range(n)
    ]


BUDGET = Budget(max_latency_ms=5.0, max_memory_mb=150.0)


def test_cmh_matches_a_hand_computed_case():
    """Device 1: 10/100 → 20/100 (N 200, m 30: E 15, V = 100·100·30·170/(200²·199) = 6.4070);
    device 2: 5/200 → 10/50 (N 250, m 15: E 3, V = 200·50·15·235/(250²·249) = 2.2651);
    z = (5 + 7)/√8.6721 = 4.0749, p = 1 − Φ(z) = 2.30e-5; risk difference
    (20·100 − 10·100)/200 + (10·200 − 5·50)/250 = 12 over 100·100/200 + 200·50/250 = 90."""
    z, p, rd = cmh([Stratum(10, 100, 20, 100), Stratum(5, 200, 10, 50)])

    assert z == pytest.approx(4.0749, rel=1e-4)
    assert p == pytest.approx(2.3015e-5, rel=1e-3)
    assert rd == pytest.approx(12 / 90, rel=1e-12)


def mixed(a: tuple[float, float], b: tuple[float, float]) -> list[DeviceHealth]:
    """Device A with 500 windows before and 50 after, B with 50 before and 200 after, at
    the anomaly rates (before, after) given for each."""
    return [
        DeviceHealth("A", "installed", before=beat(a[0], 500), after=beat(a[1], 50)),
        DeviceHealth("B", "installed", before=beat(b[0], 50), after=beat(b[1], 200)),
    ]


def test_unchanged_devices_with_shifting_window_counts_do_not_abort():
    """A at 2% and B at 30% both sides: pooled, 0.045 → 0.244 (p ≈ 2e-17) would abort; within
    each device nothing changed, so the stratified test finds nothing."""
    verdict = judge(devices=mixed((0.02, 0.02), (0.30, 0.30)), budget=BUDGET,
                    thresholds=Thresholds())  # fmt: skip

    assert verdict.figures["anomaly_before"] == pytest.approx(0.045, abs=1e-3)
    assert verdict.figures["anomaly_after"] == pytest.approx(0.244, abs=1e-3)
    assert verdict.figures["risk_difference"] == pytest.approx(0.0)
    assert verdict.figures["p_value"] == pytest.approx(0.5)
    assert not verdict.abort


def test_a_rise_on_every_device_aborts_even_when_the_pooled_rate_falls():
    """A 2% → 10% with 100 windows before and 1000 after, B 30% → 38% with 400 before and
    100 after: pooled 0.244 → 0.125 falls, yet each device rose 8 points: abort."""
    devices = [
        DeviceHealth("A", "installed", before=beat(0.02, 100), after=beat(0.10, 1000)),
        DeviceHealth("B", "installed", before=beat(0.30, 400), after=beat(0.38, 100)),
    ]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.figures["anomaly_after"] < verdict.figures["anomaly_before"]
    assert verdict.figures["risk_difference"] >= 0.05
    assert verdict.figures["p_value"] < 0.01
    assert verdict.abort and "within devices" in verdict.reasons[0]


@pytest.mark.parametrize(
    "devices",
    [healthy(before=0.30, after=0.05), mixed((0.10, 0.02), (0.40, 0.30))],
    ids=["fall", "fall-that-pools-as-a-rise"],
)
def test_a_fall_never_aborts(devices):
    """Anomaly rates falling on every device, even when the pooled rate rises: no abort."""
    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.figures["risk_difference"] < 0
    assert verdict.figures["p_value"] > 0.5
    assert not verdict.abort


def test_healthy_wave_goes_on_with_its_figures():
    """Same anomaly rate, within budgets, no errors: no abort, the figures recorded."""
    verdict = judge(devices=healthy(), budget=BUDGET, thresholds=Thresholds())

    assert not verdict.abort
    assert verdict.figures["windows_before"] == 400
    assert verdict.figures["anomaly_after"] == pytest.approx(0.05)
    assert verdict.figures["p_value"] == pytest.approx(0.5)
    assert verdict.figures["latency_ms_p99_after"] == 2.0


def test_anomaly_jump_aborts():
    """Four devices each 5% → 15%: p ≪ 0.01 and a rise of 10 points abort."""
    verdict = judge(
        devices=healthy(before=0.05, after=0.15), budget=BUDGET, thresholds=Thresholds()
    )

    assert verdict.abort
    assert "anomaly rate rose" in verdict.reasons[0]
    assert verdict.figures["p_value"] < 0.01


def test_significant_but_small_rise_does_not_abort():
    """A rise of 2 points over many windows is significant but below the minimum effect."""
    devices = [DeviceHealth("d0", "installed", before=beat(0.05, 20000), after=beat(0.07, 20000))]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.figures["p_value"] < 0.01
    assert not verdict.abort


def test_large_rise_on_few_windows_is_not_significant():
    """1/10 → 3/10 rises 20 points but p > 0.01: not enough evidence to abort."""
    devices = [DeviceHealth("d0", "installed", before=beat(0.1, 10), after=beat(0.3, 10))]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.figures["p_value"] > 0.01
    assert not verdict.abort


@pytest.mark.parametrize("state", ["failed", "rejected", "rolled_back"])
def test_any_failed_install_aborts(state):
    """One refused, failed or self-rolled-back install aborts, with its reason."""
    devices = [*healthy(3), DeviceHealth("bad", state, reason="smoke_check_failed")]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.abort
    assert verdict.reasons == (f"bad {state} (smoke_check_failed)",)


def test_inference_errors_rising_abort():
    """A device whose inference error count rose after the install aborts."""
    devices = [
        *healthy(3),
        DeviceHealth("e", "installed", before=beat(0.05), after=beat(0.05, inference_errors=2)),
    ]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.abort and "inference errors rose on e" in verdict.reasons


def test_budgets_abort_when_the_target_breaks_them():
    """p99 over the profile's budget aborts; a device already over it is blamed only when
    the target is more than 20% worse; a profile without budgets is not judged on them."""
    over = DeviceHealth(
        "slow", "installed", before=beat(0.05), after=beat(0.05, latency_ms_p99=7.0)
    )
    was_over = DeviceHealth(
        "old", "installed", before=beat(0.05, memory_mb=200.0), after=beat(0.05, memory_mb=230.0)
    )
    much_worse = DeviceHealth(
        "big", "installed", before=beat(0.05, memory_mb=200.0), after=beat(0.05, memory_mb=260.0)
    )

    assert judge(devices=[over], budget=BUDGET, thresholds=Thresholds()).abort
    assert not judge(devices=[was_over], budget=BUDGET, thresholds=Thresholds()).abort
    assert judge(devices=[much_worse], budget=BUDGET, thresholds=Thresholds()).abort
    assert not judge(devices=[over], budget=Budget(), thresholds=Thresholds()).abort


def test_labelled_accuracy_drop_aborts_with_enough_labels():
    """90% → 80% on 50 labels each aborts (drop 10 > 5 points); on 10 labels it is not judged."""
    many = LabelCounts(target_correct=40, target_total=50, previous_correct=45, previous_total=50)
    few = LabelCounts(target_correct=8, target_total=10, previous_correct=9, previous_total=10)

    assert judge(devices=healthy(), budget=BUDGET, thresholds=Thresholds(), labels=many).abort
    assert not judge(devices=healthy(), budget=BUDGET, thresholds=Thresholds(), labels=few).abort


def test_devices_not_yet_dwelt_are_left_out_of_the_statistics():
    """A device still without post-install health adds no windows to the test."""
    devices = [*healthy(2), DeviceHealth("late", "installed", before=beat(0.05))]

    verdict = judge(devices=devices, budget=BUDGET, thresholds=Thresholds())

    assert verdict.figures["dwelt"] == 2
    assert verdict.figures["windows_after"] == 200
