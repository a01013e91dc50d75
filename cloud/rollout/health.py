"""The judgement of one wave: from its devices' update states and heartbeat health before
and after the install, abort or go on, with every figure it looked at. Pure: no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# An update state that aborts at once: the device refused or failed the install, or rolled
# itself back because the new model failed on real windows.
FAILED_STATES = ("failed", "rejected", "rolled_back")
SILENT = "silent: "  # how a failed row's reason starts when the device said nothing in time
# Refusals that are the device's link or clock, not the release: after the canary wave,
# treated like silence (left out of the judgement, offered again).
LINK_REASONS = frozenset({"transfer_failed", "internal_error", "expired_metadata"})
LEFT, GONE = "left the profile", "no longer registered"  # a planned device that is not here


def link_refusal(state: str, reason: str | None) -> bool:
    return state in ("failed", "rejected") and reason in LINK_REASONS


def left_out(*, wave: int, state: str, reason: str | None) -> bool:
    """An update row not judged: its device left the profile, or, after the canary wave
    (a canary that cannot be judged fails the rollout), it is silent or its refusal is its
    link's or clock's: one device offline must not roll back a fleet."""
    if reason in (LEFT, GONE):
        return True
    silent = state == "failed" and (reason or "").startswith(SILENT)
    return wave > 0 and (silent or link_refusal(state, reason))


@dataclass(frozen=True)
class DeviceHealth:
    """One device of the wave: its update row's state and its health (devices.health, as
    the ingest records heartbeats) before the install and after its dwell on the target
    (None while it has not dwelt)."""

    device_id: str
    state: str
    reason: str | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] | None = None


@dataclass(frozen=True)
class Budget:
    """The profile's budgets (None: the profile sets none)."""

    max_latency_ms: float | None = None
    max_memory_mb: float | None = None


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.01
    min_effect: float = 0.05
    max_accuracy_drop_pts: float = 5.0
    min_labels: int = 30


@dataclass(frozen=True)
class LabelCounts:
    """Labelled feedback from the wave's devices: samples their target model classified,
    and samples their previous model classified, that carry a ground-truth label."""

    target_correct: int = 0
    target_total: int = 0
    previous_correct: int = 0
    previous_total: int = 0


@dataclass(frozen=True)
class Verdict:
    abort: bool
    reasons: tuple[str, ...]
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"abort": self.abort, "reasons": list(self.reasons), **self.figures}


@dataclass(frozen=True)
class Stratum:
    """One device's windows: anomalous of all before the install (x1 of n1), after (x2 of n2)."""

    x1: int
    n1: int
    x2: int
    n2: int


def cmh(strata: Sequence[Stratum]) -> tuple[float, float, float]:
    """``(z, p, rd)``: the Cochran–Mantel–Haenszel test, stratified by device, that the
    anomaly rate after exceeds the rate before, and the Mantel–Haenszel risk difference.

    Per device i, with Nᵢ = n1ᵢ + n2ᵢ and mᵢ = x1ᵢ + x2ᵢ, the "after" count x2ᵢ has, with
    no change, mean Eᵢ = n2ᵢ·mᵢ/Nᵢ and (hypergeometric) variance
    Vᵢ = n1ᵢ·n2ᵢ·mᵢ·(Nᵢ − mᵢ) / (Nᵢ²·(Nᵢ − 1)); then z = Σ(x2ᵢ − Eᵢ) / √ΣVᵢ and
    p = 1 − Φ(z) (one-sided: a model whose anomaly rate falls is no reason to stop).
    rd = Σ (x2ᵢ·n1ᵢ − x1ᵢ·n2ᵢ)/Nᵢ ÷ Σ n1ᵢ·n2ᵢ/Nᵢ, the rise within devices. Pooling the
    counts across devices instead would compare different mixes of devices whenever
    their window counts differ before and after. Strata with no windows on a side add
    nothing; with no variance at all (every window anomalous, or none) z = 0, p = 1."""
    dev = var = num = den = 0.0
    for s in strata:
        n, m = s.n1 + s.n2, s.x1 + s.x2
        if not s.n1 or not s.n2:
            continue
        dev += s.x2 - s.n2 * m / n
        if n > 1:
            var += s.n1 * s.n2 * m * (n - m) / (n * n * (n - 1))
        num += (s.x2 * s.n1 - s.x1 * s.n2) / n
        den += s.n1 * s.n2 / n
    rd = num / den if den else 0.0
    if var <= 0:
        return 0.0, 1.0, rd
    z = dev / math.sqrt(var)
    return z, 0.5 * math.erfc(z / math.sqrt(2)), rd  # P(Z ≥ z)


# A device already over a budget on the old model is blamed on the new one only when the
# new figure is this much worse (peak RSS, what memory_mb reports, never falls in a process).
ALREADY_OVER_SLACK = 0.2


def over_budget(before: float, after: float, limit: float) -> bool:
    """The target's figure breaks the budget: over it, having been within it (or unknown,
    0), or over by more than the slack on top of an old model that was over already."""
    if after <= limit:
        return False
    return before <= limit or after > before * (1 + ALREADY_OVER_SLACK)


def install_failures(devices: Sequence[DeviceHealth]) -> list[str]:
    """Why the wave must stop now, whatever its health figures: a failed, refused or
    self-rolled-back install."""
    return [
        f"{d.device_id} {d.state}" + (f" ({d.reason})" if d.reason else "")
        for d in devices
        if d.state in FAILED_STATES
    ]


def _count(h: dict[str, Any]) -> tuple[int, int]:
    """(anomalous windows, windows) of one heartbeat: the rate is over recent_windows."""
    n = int(h.get("recent_windows") or 0)
    return round(float(h.get("anomaly_rate") or 0.0) * n), n


def _num(h: dict[str, Any] | None, key: str) -> float:
    return float((h or {}).get(key) or 0.0)


def judge(
    *,
    devices: Sequence[DeviceHealth],
    budget: Budget,
    thresholds: Thresholds,
    labels: LabelCounts | None = None,
) -> Verdict:
    """Abort if any install failed or rolled back, inference errors rose on any device, the
    target's p99 latency or memory breaks the profile's budget (``over_budget``), the
    anomaly rate rose within devices (``cmh``: p < alpha) by a Mantel–Haenszel risk
    difference of at least the minimum effect, or labelled accuracy fell by more than the
    allowed points."""
    reasons = install_failures(devices)
    dwelt = [d for d in devices if d.after is not None]
    figures: dict[str, Any] = {
        "devices": len(devices),
        "dwelt": len(dwelt),
        "installed": sum(d.state == "installed" for d in devices),
        "failed": sum(d.state in ("failed", "rejected") for d in devices),
        "rolled_back": sum(d.state == "rolled_back" for d in devices),
    }
    errors = [
        d.device_id
        for d in dwelt
        if _num(d.after, "inference_errors") > _num(d.before, "inference_errors")
    ]
    figures["inference_errors_rose"] = len(errors)
    if errors:
        reasons.append(f"inference errors rose on {', '.join(errors)}")

    for key, limit, unit in (
        ("latency_ms_p99", budget.max_latency_ms, "ms"),
        ("memory_mb", budget.max_memory_mb, "MB"),
    ):
        worst = max((_num(d.after, key) for d in dwelt), default=None)
        figures[f"{key}_before"] = max((_num(d.before, key) for d in dwelt), default=None)
        figures[f"{key}_after"] = worst
        figures[f"{key}_budget"] = limit
        if limit is None:
            continue
        over = [
            d.device_id
            for d in dwelt
            if over_budget(_num(d.before, key), _num(d.after, key), limit)
        ]
        if over:
            reasons.append(f"{key} over the profile's {limit:g} {unit} on {', '.join(over)}")

    strata = []
    for d in dwelt:
        b, a = _count(d.before), _count(d.after or {})
        if b[1] and a[1]:  # the same devices each side, or the comparison is not like for like
            strata.append(Stratum(b[0], b[1], a[0], a[1]))
    x1, n1 = sum(s.x1 for s in strata), sum(s.n1 for s in strata)
    x2, n2 = sum(s.x2 for s in strata), sum(s.n2 for s in strata)
    # The crude pooled rates are shown, for operators; the test is within devices.
    figures.update(windows_before=n1, windows_after=n2, z=None, p_value=None)
    figures.update(risk_difference=None, strata=len(strata))
    figures["anomaly_before"] = x1 / n1 if n1 else None
    figures["anomaly_after"] = x2 / n2 if n2 else None
    if strata:
        z, p, rd = cmh(strata)
        figures.update(z=z, p_value=p, risk_difference=rd)
        if p < thresholds.alpha and rd >= thresholds.min_effect:
            reasons.append(
                f"anomaly rate rose {rd:+.3f} within devices (Mantel–Haenszel; "
                f"p = {p:.2g} < {thresholds.alpha:g}, rise ≥ {thresholds.min_effect:g})"
            )

    labels = labels or LabelCounts()
    acc_t = labels.target_correct / labels.target_total if labels.target_total else None
    acc_p = labels.previous_correct / labels.previous_total if labels.previous_total else None
    figures.update(
        accuracy_target=acc_t,
        accuracy_previous=acc_p,
        labels_target=labels.target_total,
        labels_previous=labels.previous_total,
    )
    if (
        acc_t is not None
        and acc_p is not None
        and min(labels.target_total, labels.previous_total) >= thresholds.min_labels
        and (acc_p - acc_t) * 100 > thresholds.max_accuracy_drop_pts
    ):
        reasons.append(
            f"labelled accuracy fell {acc_p:.1%} → {acc_t:.1%} "
            f"(more than {thresholds.max_accuracy_drop_pts:g} points)"
        )
    return Verdict(abort=bool(reasons), reasons=tuple(reasons), figures=figures)
