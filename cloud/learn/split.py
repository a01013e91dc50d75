"""Which of a round's new labelled uploads it learns from, which choose among settings
(validation) and which judge it (hold-out), split so that no two sides share a sample.

Windows overlap in time (a device cuts them with a stride shorter than their width), so a
split by window — by content hash, say — puts halves of the same samples on both sides.
Uploads carry no episode, so the split is by device and time block: each device's time is
cut into blocks of ``block_s`` seconds, and each block goes whole to one side, drawn from a
hash of (device, block) so it falls on the same side in every round. A window is the
``window_s`` seconds up to its ``captured_at``; two windows share a sample when their ends
are less than ``window_s`` apart. A window that close to a block of a side that ranks above
its own (hold-out, then validation, then training) is dropped from the round: the gap of at
least one window between blocks of different sides.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, Protocol, TypeVar

Side = Literal["hold", "val", "fit"]
RANK: dict[Side, int] = {"hold": 2, "val": 1, "fit": 0}


class Timed(Protocol):
    @property
    def device_id(self) -> str: ...

    @property
    def captured_at(self) -> datetime: ...


@dataclass(frozen=True)
class SplitConfig:
    holdout_fraction: float = 0.25  # of (device, block)s, for the gates
    validation_fraction: float = 0.15  # of (device, block)s, for choices (compression's student)
    block_s: float = 3600.0  # one block of a device's time
    window_s: float = 1152.0  # what a window spans (TEP default: 32 samples of 36 s)

    def check(self) -> None:
        from shared.errors import ConfigError

        if not (self.holdout_fraction >= 0 and self.validation_fraction >= 0):
            raise ConfigError("holdout_fraction and validation_fraction must be ≥ 0")
        if self.holdout_fraction + self.validation_fraction >= 1:
            raise ConfigError(
                f"holdout_fraction {self.holdout_fraction} + validation_fraction "
                f"{self.validation_fraction} leave nothing to train on; keep their sum below 1"
            )
        if not 0 < self.window_s <= self.block_s:
            raise ConfigError(
                f"block_s ({self.block_s}) must be at least one window (window_s "
                f"{self.window_s}) and window_s positive: a block shorter than a window is "
                "all gap"
            )


def block_side(device_id: str, block: int, cfg: SplitConfig) -> Side:
    digest = hashlib.sha256(f"{device_id}\x00{block}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.holdout_fraction:
        return "hold"
    if u < cfg.holdout_fraction + cfg.validation_fraction:
        return "val"
    return "fit"


def side_of(upload: Timed, cfg: SplitConfig) -> Side | None:
    """The side ``upload`` falls on, or None when it lies in a gap (too close to a block of
    a higher-ranked side to stay disjoint from it)."""
    t = upload.captured_at.timestamp()
    own = block_side(upload.device_id, math.floor(t / cfg.block_s), cfg)
    # Every block a window sharing a sample with this one could end in: (t - w, t + w).
    first = math.floor((t - cfg.window_s) / cfg.block_s)
    last = math.floor((t + cfg.window_s) / cfg.block_s)
    for block in range(first, last + 1):
        start, end = block * cfg.block_s, (block + 1) * cfg.block_s
        # Ends in [start, end) lie less than one window from t only if the block reaches
        # into the open interval (t - w, t + w).
        if end <= t - cfg.window_s or start >= t + cfg.window_s:
            continue
        if RANK[block_side(upload.device_id, block, cfg)] > RANK[own]:
            return None
    return own


U = TypeVar("U", bound=Timed)


@dataclass
class Split(Generic[U]):
    fit: list[U]
    val: list[U]
    hold: list[U]
    gap: list[U]  # dropped from this round: too close to another side


def split_uploads(uploads: Sequence[U], cfg: SplitConfig) -> Split[U]:
    out: Split[U] = Split([], [], [], [])
    for u in uploads:
        side = side_of(u, cfg)
        {"fit": out.fit, "val": out.val, "hold": out.hold, None: out.gap}[side].append(u)
    return out
