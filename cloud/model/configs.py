"""Training settings, free of torch: round settings and the CLI read them without it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
