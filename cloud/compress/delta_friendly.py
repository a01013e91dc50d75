"""Delta-friendly recompression: a round's student kept close to the previous package in the
stored domain (warm start from the previous student, the previous INT8 grid kept, code
changes held to a budget), so a device downloads a small delta of what the cloud evaluated.

Why: re-running ORT's quantizer on a retrained student moves 92-97% of the INT8 codes (new
per-channel scales, every weight a little different), and a binary delta of that saves
only 1.2-1.4x. Here the new student starts from the previous one (its FP32 shadow, not the
codes), is distilled from the round's teacher with an optional pull toward the previous
codes, and is then written on the previous package's scales and zero points: a code moves
only where its weight left the old code's rounding cell by more than ``margin`` steps, and
at most a ``budget`` share of codes moves (the largest moves win). Columns the old grid
cannot hold (a weight past 127 steps) and new head columns (a new class) take ORT's fresh
grid. The package is still ORT's graph for that student, byte for byte in its structure:
only initializer values differ, so the cloud evaluates the exact bytes a device rebuilds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from cloud.compress.distill import logits_of
from cloud.compress.quantization import QuantRow, plan_table, quantize, split_gemms
from cloud.model.export import export_onnx, package_graph
from cloud.model.train import balanced_weights, extend_classes, one_cycle
from cloud.model.transformer import SensorTransformer
from shared.package import ModelPackage

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes (K, N), scale (N,), zero point (N,)
CODE_SUFFIXES = ("_quantized", "_scale", "_zero_point")


def int8_weights(graph: bytes) -> dict[str, Triple]:
    """Every weight ORT's dynamic quantizer stored as INT8 in ``graph``: its name (without
    the suffix) → (codes (K, N), per-column scale (N,), zero point (N,))."""
    inits = {t.name: t for t in onnx.load_from_string(graph).graph.initializer}
    out = {}
    for name, t in inits.items():
        if not name.endswith("_quantized") or t.data_type != onnx.TensorProto.INT8:
            continue
        w = name[: -len("_quantized")]
        if f"{w}_scale" in inits and f"{w}_zero_point" in inits:
            out[w] = (
                numpy_helper.to_array(t),
                numpy_helper.to_array(inits[f"{w}_scale"]),
                numpy_helper.to_array(inits[f"{w}_zero_point"]),
            )
    return out


@dataclass
class GridReport:
    """What keeping the grid did: codes on the old grid, how many moved, and the columns
    that had to take a fresh grid."""

    codes: int = 0  # codes on a kept grid
    changed: int = 0  # of those, how many differ from the previous package
    wanted: int = 0  # how many would move with plain rounding on the old grid
    regridded_columns: int = 0  # old columns the old grid could not hold
    clipped: int = 0  # weights past the grid's end (within the slack), clipped to it
    new_columns: int = 0  # columns the previous package did not have (new classes)
    fresh_tensors: list[str] = field(default_factory=list)  # no previous tensor to keep
    per_tensor: dict[str, list[int]] = field(default_factory=dict)  # name → [changed, codes]

    @property
    def changed_share(self) -> float:
        return self.changed / max(self.codes, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "codes": self.codes,
            "changed": self.changed,
            "changed_share": self.changed_share,
            "wanted": self.wanted,
            "regridded_columns": self.regridded_columns,
            "clipped": self.clipped,
            "new_columns": self.new_columns,
            "fresh_tensors": self.fresh_tensors,
        }


def requantize_on_grid(
    float_graph: bytes,
    rows: list[QuantRow],
    previous_graph: bytes,
    *,
    margin: float = 0.0,
    budget: float | None = None,
    slack: float = 2.0,
) -> tuple[bytes, GridReport]:
    """``float_graph`` quantized as ``rows`` say (ORT, for the graph's structure), with every
    INT8 weight that ``previous_graph`` holds under the same name written on the previous
    scales and zero points: a code moves only where ``|w/scale + zp − old code| > 0.5 +
    margin``, and with ``budget`` at most that share of all kept-grid codes moves (the
    largest moves first). A weight past the grid's end by at most ``slack`` steps is clipped
    to it; a column with one further out, and new columns, take ORT's fresh grid."""
    proto = onnx.load_from_string(quantize(float_graph, rows))
    floats = {
        t.name: numpy_helper.to_array(t).astype(np.float64)
        for t in split_gemms(onnx.load_from_string(float_graph)).graph.initializer
    }
    fresh = int8_weights(proto.SerializeToString())
    prev = int8_weights(previous_graph)
    report = GridReport()
    plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, (q_f, s_f, z_f) in fresh.items():
        old = prev.get(name)
        if old is None or name not in floats or old[0].shape[0] != q_f.shape[0]:
            report.fresh_tensors.append(name)
            continue
        q_o, s_o, z_o = old
        n_old = q_o.shape[1]
        if n_old > q_f.shape[1]:
            report.fresh_tensors.append(name)
            continue
        w = floats[name]  # (K, N)
        scale, zp = s_f.copy(), z_f.copy()
        scale[:n_old], zp[:n_old] = s_o, z_o
        u = w[:, :n_old] / s_o.astype(np.float64) + z_o  # real-valued codes on the old grid
        lo, hi = _code_range(q_o, z_o)
        fits = (u.min(axis=0) >= lo - 0.5 - slack) & (u.max(axis=0) <= hi + 0.5 + slack)
        report.clipped += int(((u < lo - 0.5) | (u > hi + 0.5))[:, fits].sum())
        keep = np.flatnonzero(fits)
        scale[:n_old][~fits] = s_f[:n_old][~fits]
        zp[:n_old][~fits] = z_f[:n_old][~fits]
        dist = np.abs(u - q_o)
        dist[:, ~fits] = 0.0
        proposal = np.clip(np.rint(u), lo, hi).astype(np.int8)
        plans[name] = (q_f, q_o, proposal, dist, keep)
        report.regridded_columns += int((~fits).sum())
        report.new_columns += q_f.shape[1] - n_old
        report.wanted += int((proposal[:, keep] != q_o[:, keep]).sum())
        report.codes += q_o.shape[0] * len(keep)
        _put(proto, f"{name}_scale", scale.astype(s_f.dtype))
        _put(proto, f"{name}_zero_point", zp.astype(z_f.dtype))
    threshold = 0.5 + margin
    if budget is not None and plans:
        moves = np.concatenate([d[d > threshold] for *_, d, _ in plans.values()])
        allowed = int(budget * report.codes)
        if len(moves) > allowed:
            # the allowed-th largest move: only moves beyond it are made
            cut = len(moves) - allowed - 1
            threshold = float(np.partition(moves, cut)[cut]) if allowed else np.inf
    for name, (q_f, q_o, proposal, dist, keep) in plans.items():
        codes = q_f.copy()  # new columns and regridded ones: ORT's fresh codes
        n_old = q_o.shape[1]
        move = dist > threshold
        kept = np.where(move, proposal, q_o)
        codes[:, keep] = kept[:, keep]
        changed = int((codes[:, :n_old][:, keep] != q_o[:, keep]).sum())
        report.changed += changed
        report.per_tensor[name] = [changed, q_o.shape[0] * len(keep)]
        _put(proto, f"{name}_quantized", codes)
    return proto.SerializeToString(), report


def _code_range(codes: np.ndarray, zp: np.ndarray) -> tuple[int, int]:
    """The codes ORT's symmetric INT8 uses ([-127, 127]) unless the tensor already holds
    -128 (an asymmetric grid)."""
    return (-128 if codes.min() < -127 or zp.any() else -127), 127


def _put(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Set initializer ``name`` to ``value``, left untouched when the values are the same and
    stored the way it was (raw bytes, or ORT's int32_data for small zero points): a tensor
    whose storage changed would cost the delta its whole size for nothing."""
    for t in proto.graph.initializer:
        if t.name != name:
            continue
        old = numpy_helper.to_array(t)
        if old.shape == value.shape and np.array_equal(old, value):
            return
        if t.HasField("raw_data"):
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
            t.CopyFrom(helper.make_tensor(name, dtype, value.shape, value.flatten().tolist()))
        return
    raise KeyError(name)


# -- training close to the previous codes --------------------------------------------------------


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
    scores = [
        (a.param.grad[: len(a.ref)].abs() * a.step).flatten()
        for a in pull
        if a.param.grad is not None
    ]
    flat = torch.cat(scores)
    k = int(share * flat.numel())
    cut = torch.topk(flat, k).values[-1] if k else torch.tensor(float("inf"))
    masks = {}
    for a in pull:
        grad = a.param.grad if a.param.grad is not None else torch.zeros_like(a.param)
        m = torch.ones_like(a.param)
        m[: len(a.ref)] = ((grad[: len(a.ref)].abs() * a.step) >= cut).float()
        masks[id(a.param)] = m
    student.zero_grad()
    student.eval()
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


def delta_friendly_student(
    *,
    previous_student: SensorTransformer,
    previous_package: bytes,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    share: float | None,
    cfg: CloseConfig,
) -> SensorTransformer:
    """The round's student, warm: ``previous_student`` with its head grown to ``n_classes``
    and its INT8-stored weights set to ``previous_package``'s codes (dequantized), distilled
    from ``teacher`` on ``x, y`` with only the ``share`` most salient of those weights free
    to move (None: all), the head always."""
    student = extend_classes(copy.deepcopy(previous_student), n_classes)
    assert isinstance(student, SensorTransformer)
    pull = anchors(student, ModelPackage(previous_package).graph)
    snap_to_codes(pull)
    masks = None
    if share is not None:
        masks = saliency_masks(student, teacher, x, y, pull, share, cfg)
        head = student.get_submodule(head_path(student))
        assert isinstance(head, nn.Linear)
        masks[id(head.weight)] = torch.ones_like(head.weight)
    distill_close(student, teacher, x, y, cfg, pull=pull, masks=masks)
    return student


# -- the round's entry point -----------------------------------------------------------------


@dataclass
class CloseResult:
    package: bytes
    student: SensorTransformer  # the FP32 shadow the next round starts from
    grid: GridReport
    rows: list[QuantRow]


def recompress_close_to(
    *,
    previous_package: bytes,
    previous_student: SensorTransformer,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    version: str,
    parent: str | None,
    cfg: CloseConfig | None = None,
    share: float | None = None,
    margin: float = 0.0,
    budget: float | None = None,
    student: SensorTransformer | None = None,
) -> CloseResult:
    """The round's package close to ``previous_package``: ``previous_student`` (the FP32
    model that package was quantized from; its head grown to ``class_names``) distilled
    from the round's ``teacher`` on ``x, y`` with the ``share`` most salient INT8 weights
    free (delta_friendly_student), then written on the previous grid (``margin``, ``budget``:
    requantize_on_grid's). The package keeps the previous manifest's name, profile and
    metadata. Pass ``student`` (already distilled) to only requantize it."""
    prev = ModelPackage(previous_package)
    meta = dict(prev.manifest.metadata)
    meta.pop("model_config", None)
    if student is None:
        student = delta_friendly_student(
            previous_student=previous_student, previous_package=previous_package,
            teacher=teacher, x=x, y=y, n_classes=len(class_names), share=share,
            cfg=cfg or CloseConfig(),
        )  # fmt: skip
    graph = export_onnx(student, meta.get("ood"))
    schemes = {r[2] for r in meta.get("compression", {}).get("quantization", [])}
    rows = _rows_like(graph, meta)
    if schemes - {"int8", "fp32"}:
        raise ValueError(f"grid-kept requantization handles INT8 profiles only, not {schemes}")
    qgraph, report = requantize_on_grid(graph, rows, prev.graph, margin=margin, budget=budget)
    package = package_graph(
        qgraph,
        student,
        name=prev.manifest.name,
        version=version,
        parent=parent,
        profile=prev.manifest.profile,
        class_names=class_names,
        metadata=meta,
    )
    return CloseResult(package, student, report, rows)


def _rows_like(graph: bytes, meta: dict[str, Any]) -> list[QuantRow]:
    """The previous package's quantization table applied to this graph: each weight the
    scheme the previous one recorded (the profile's, by role), by name."""
    recorded = {w: s for _, w, s in meta.get("compression", {}).get("quantization", [])}
    rows = plan_table(graph, {"attention": "int8", "ffn": "int8", "other": "int8"})
    from dataclasses import replace

    return [replace(r, scheme=recorded.get(r.weight, r.scheme)) for r in rows]
