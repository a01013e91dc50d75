"""Training a window classifier (any of cloud.model's): class-balanced cross-entropy, a
one-cycle schedule, growing the label space, and predictions in torch."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud.model.classifier import Classifier
from cloud.model.configs import TrainConfig
from cloud.model.metrics import classification_metrics


def extend_classes(model: Classifier, n_classes: int) -> Classifier:
    """The same model with room for new classes: every weight is kept, and the output rows
    of the old classes are kept as they were. Any model whose ``cfg`` dataclass has
    ``n_classes`` and rebuilds it (cloud.model.cnn, cloud.model.transformer)."""
    old = model.cfg.n_classes
    if n_classes < old:
        raise ValueError(f"cannot shrink the label space from {old} to {n_classes}")
    if n_classes == old:
        return model
    torch.manual_seed(n_classes)  # the new rows' initial weights, the same on every run
    bigger = type(model)(replace(model.cfg, n_classes=n_classes))  # type: ignore[arg-type]
    state = bigger.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            target = state[key]
            if target.shape == value.shape:
                target.copy_(value)
            elif target.shape[1:] == value.shape[1:] and (target.shape[0], value.shape[0]) == (
                n_classes,
                old,
            ):
                target[:old] = value  # an output layer: the old classes' rows
            else:
                raise ValueError(
                    f"{key}: cannot grow {tuple(value.shape)} to {tuple(target.shape)}"
                )
    bigger.load_state_dict(state)
    return bigger


def balanced_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class loss weights inverse to frequency (mean 1 over the classes present; labels
    below 0, unlabelled, are not counted)."""
    counts = torch.bincount(y[y >= 0], minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
    return weights / weights[counts > 0].mean()


def one_cycle(model: nn.Module, n: int, cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a one-cycle schedule over ``cfg.epochs`` passes of ``n`` windows."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-n // cfg.batch_size))
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)


def train(
    model: Classifier,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    on_epoch: Any = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    on_validate: Any = None,
) -> Classifier:
    """Class-balanced cross-entropy with AdamW and a cosine schedule; ``on_epoch(i, loss)``.

    With a validation set ``val`` (windows, class indices; disjoint from ``x``), the model
    is scored on it after every epoch (macro-F1 over the classes it holds,
    ``on_validate(i, f1)``) and the best epoch's weights are kept: the latest of equals,
    which the schedule has annealed furthest. Early stopping by selection, never on what a
    report or gate reads."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(weight=balanced_weights(yt, model.cfg.n_classes))
    opt, sched = one_cycle(model, len(xt), cfg)
    best: tuple[float, dict[str, Any]] | None = None
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
        if val is not None and len(val[0]):
            f1 = _macro_f1(model, val[0], val[1])
            if on_validate is not None:
                on_validate(epoch, f1)
            if best is None or f1 >= best[0]:
                best = (f1, copy.deepcopy(model.state_dict()))
            model.train()
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model


def _macro_f1(model: Classifier, x: np.ndarray, y: np.ndarray) -> float:
    n = model.cfg.n_classes
    return classification_metrics(y, predict(model, x), [str(i) for i in range(n)]).macro_f1


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [
        model(torch.as_tensor(x[i : i + batch], dtype=torch.float32)).numpy()
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(out).argmax(1)
