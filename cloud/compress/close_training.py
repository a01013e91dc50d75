"""Training a round's student close to the previous package's codes: each INT8-stored Linear
matched to its codes (anchors), a start from those codes dequantized, saliency masks that
leave all but the most useful share of weights exactly in place, and the distillation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.compress.distill import logits_of
from cloud.compress.grid import int8_weights
from cloud.model.train import balanced_weights, one_cycle


@dataclass
class CloseConfig:
    """The warm start's distillation: few epochs at a low rate from the previous student."""

    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # soft (teacher) loss weight; 1 − alpha on the hard labels
    weight_decay: float = 0.0  # decay pulls every weight toward 0: every code would move
    anchor: float = 0.0  # weight of the mean |w − previous code| / scale (in code steps)
    train_fp32: bool = False  # norms and biases are stored FP32: any change costs them whole
    seed: int = 0


@dataclass
class Anchor:
    param: torch.Tensor  # (out, in) an nn.Linear's weight (a parameter)
    ref: torch.Tensor  # (rows, in) the previous codes, dequantized (rows ≤ out: new classes)
    step: torch.Tensor  # (rows, 1) their scales


def anchors(model: nn.Module, previous_graph: bytes) -> list[Anchor]:
    """Each nn.Linear of ``model`` matched to the INT8 weight of ``previous_graph`` it was
    stored as (same input width, at most as many outputs, nearest dequantized values)."""
    prev = int8_weights(previous_graph)
    free = dict(prev)
    out = []
    for _, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach().double()
        best: tuple[float, str] | None = None
        for name, (q, s, z) in free.items():
            k, n = q.shape
            if k != w.shape[1] or n > w.shape[0]:
                continue
            deq = torch.as_tensor(((q.astype(np.float64) - z) * s).T)
            err = float(((w[:n] - deq).abs() / torch.as_tensor(s)[:, None]).mean())
            if best is None or err < best[0]:
                best = (err, name)
        if best is None or best[0] > 1.0:  # more than a step away on average: not this one
            continue
        q, s, z = free.pop(best[1])
        ref = torch.as_tensor(((q.astype(np.float64) - z) * s).T, dtype=torch.float32)
        out.append(Anchor(mod.weight, ref, torch.as_tensor(s, dtype=torch.float32)[:, None]))
    return out


def snap_to_codes(pull: list[Anchor]) -> None:
    """Set each anchored weight to its previous code, dequantized: start from what the
    device runs, so a weight that does not train keeps its code exactly."""
    with torch.no_grad():
        for a in pull:
            a.param[: len(a.ref)] = a.ref


def saliency_masks(
    student: nn.Module,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    pull: list[Anchor],
    share: float,
    cfg: CloseConfig,
) -> dict[int, torch.Tensor]:
    """Which anchored weights may move: the ``share`` of them with the largest |gradient| ×
    scale (the loss's change per code step) over one pass of the round's data; rows of new
    classes always. Keyed by id(parameter)."""
    student.train()
    for a in pull:
        a.param.grad = None
    soft = logits_of(teacher, x)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    weights = balanced_weights(yt, soft.shape[1])
    for start in range(0, len(xt), 256):
        idx = slice(start, start + 256)
        _loss(student(xt[idx]), soft[idx], yt[idx], weights, cfg).backward()
    scores = {
        id(a.param): a.param.grad[: len(a.ref)].abs() * a.step
        if a.param.grad is not None
        else torch.zeros_like(a.ref)
        for a in pull
    }
    student.zero_grad()
    student.eval()
    return top_share(pull, scores, share)


def movement_masks(
    probe: nn.Module, pull: list[Anchor], probe_pull: list[Anchor], share: float
) -> dict[int, torch.Tensor]:
    """Which anchored weights may move: the ``share`` that moved furthest, in code steps,
    when ``probe`` (the same student, every weight free) was trained on the round's data.
    ``probe_pull`` are the probe's anchors, in the same order as ``pull``."""
    scores = {
        id(a.param): ((b.param[: len(a.ref)] - a.ref).abs() / a.step).detach()
        for a, b in zip(pull, probe_pull, strict=True)
    }
    return top_share(pull, scores, share)


def top_share(
    pull: list[Anchor], scores: dict[int, torch.Tensor], share: float
) -> dict[int, torch.Tensor]:
    """Masks (1: free) of the ``share`` of all anchored weights with the highest scores;
    rows past the anchor (new classes) always free."""
    flat = torch.cat([scores[id(a.param)].flatten() for a in pull])
    k = int(share * flat.numel())
    cut = torch.topk(flat, k).values[-1] if k else torch.tensor(float("inf"))
    masks = {}
    for a in pull:
        m = torch.ones_like(a.param)
        m[: len(a.ref)] = (scores[id(a.param)] >= cut).float()
        masks[id(a.param)] = m
    return masks


def _loss(out, soft, y, weights, cfg: CloseConfig) -> torch.Tensor:
    t = cfg.temperature
    kd = F.kl_div(F.log_softmax(out / t, dim=1), F.softmax(soft / t, dim=1), reduction="batchmean")
    return cfg.alpha * t * t * kd + (1 - cfg.alpha) * F.cross_entropy(out, y, weight=weights)


def distill_close(
    student: nn.Module,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: CloseConfig,
    *,
    pull: list[Anchor] | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    masks: dict[int, torch.Tensor] | None = None,
) -> nn.Module:
    """Distil ``teacher`` into the warm ``student`` (KL at temperature T × T² plus
    class-balanced cross-entropy, AdamW one-cycle), plus ``cfg.anchor`` × the mean distance
    of the anchored weights from their previous codes, in code steps. ``trainable`` picks
    the parameters that move (default: matrices, and FP32 ones only with ``train_fp32``;
    the head's bias always, a new class needs it); ``masks`` (saliency_masks) freeze the
    other elements of the matrices they name: with no gradient and no weight decay, Adam
    leaves them exactly where they were."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = trainable or (lambda n, p: cfg.train_fp32 or p.dim() >= 2 or n.startswith("head."))
    for n, p in student.named_parameters():
        p.requires_grad_(pick(n, p))
    hooks = [
        p.register_hook(lambda g, m=masks[id(p)]: g * m)
        for p in student.parameters()
        if masks and id(p) in masks and p.requires_grad
    ]
    soft = logits_of(teacher, x)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    weights = balanced_weights(yt, soft.shape[1])
    holder = nn.ParameterList([p for p in student.parameters() if p.requires_grad])
    opt, sched = one_cycle(holder, len(xt), cfg)
    n_anchor = sum(a.ref.numel() for a in pull or []) or 1
    student.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = _loss(student(xt[idx]), soft[idx], yt[idx], weights, cfg)
            if pull and cfg.anchor:
                dist = sum(((a.param[: len(a.ref)] - a.ref) / a.step).abs().sum() for a in pull)
                loss = loss + cfg.anchor * dist / n_anchor
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for h in hooks:
        h.remove()
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval()


def head_path(model: nn.Module) -> str:
    """The output layer: the last nn.Linear with one output per class."""
    n = model.cfg.n_classes  # type: ignore[union-attr]
    found = [
        k for k, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n
    ]
    if not found:
        raise ValueError("no output layer with one row per class")
    return found[-1]
