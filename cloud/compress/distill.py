"""Distillation: the pruned student learns the teacher's softened logits plus the labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.model.train import balanced_weights, one_cycle


@dataclass
class DistillConfig:
    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) loss; 1 − alpha on the hard labels
    weight_decay: float = 1e-4
    seed: int = 0


@torch.no_grad()
def logits_of(model: nn.Module, x: np.ndarray, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(torch.as_tensor(x[i : i + batch])) for i in range(0, len(x), batch)])


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: DistillConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Temperature-scaled KL to the teacher's logits (× T², Hinton et al.) plus
    class-balanced cross-entropy on the labels; AdamW with a one-cycle schedule.

    A label of -1 marks a window nobody labelled: it still teaches through the teacher's
    logits, which is how a fleet's unlabelled uploads help the student."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    soft = logits_of(teacher, x)  # the teacher is fixed: its logits are computed once
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    weights = balanced_weights(yt, soft.shape[1])
    opt, sched = one_cycle(student, len(xt), cfg)
    t = cfg.temperature
    student.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = student(xt[idx])
            kd = F.kl_div(
                F.log_softmax(out / t, dim=1),
                F.softmax(soft[idx] / t, dim=1),
                reduction="batchmean",
            )
            labelled = yt[idx] >= 0  # windows without a label learn from the teacher only
            ce = (
                F.cross_entropy(out[labelled], yt[idx][labelled], weight=weights)
                if labelled.any()
                else out.sum() * 0.0
            )
            loss = cfg.alpha * t * t * kd + (1 - cfg.alpha) * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
    return student.eval()
