"""Choosing a model on the validation set: train each candidate (architecture and training
settings) on the training windows, keep the one with the best validation macro-F1.

The one place where a model's own architecture and training settings are chosen, for every
caller (`edgeloop cloud teacher`, bench/compression.py's teacher and baselines). It is
given training and validation windows only: the golden set cannot reach the choice,
because no argument carries it. Deterministic: each candidate starts from the same seed
(initial weights and batch order), and ties go to the smaller model, then to the earlier
candidate.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from cloud.model.classifier import Classifier
from cloud.model.cnn import ModelConfig, WindowClassifier
from cloud.model.configs import TrainConfig
from cloud.model.metrics import classification_metrics
from cloud.model.standardise import fit_input_stats
from cloud.model.train import predict, train
from cloud.model.transformer import ModelSpec, SensorTransformer
from shared.errors import DataError

KINDS = ("transformer", "cnn")
# Set from the data, never by a candidate.
_FROM_DATA = ("window", "channels", "n_classes")
_ARCH = {
    "transformer": {f.name: f.type for f in fields(ModelSpec) if f.name not in _FROM_DATA},
    "cnn": {f.name: f.type for f in fields(ModelConfig) if f.name not in _FROM_DATA},
}
# The seed is the caller's (one per paired run), not a setting to choose.
_TRAIN = {f.name: f.type for f in fields(TrainConfig) if f.name != "seed"}
# `edgeloop cloud teacher`'s default: depth is what a teacher most often has too much of
# (block influence of blocks 2-6 measured at 0.004-0.03 on the 8-class TEP task).
DEFAULT_GRID = ("layers=1,2,4,6",)


@dataclass(frozen=True)
class Candidate:
    """One setting to try: a model kind, architecture fields (ModelSpec for a transformer,
    cloud.model.cnn.ModelConfig for the CNN) and TrainConfig settings."""

    kind: str = "transformer"
    arch: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {KINDS}")
        bad = sorted(set(self.arch) - set(_ARCH[self.kind])) + sorted(set(self.train) - set(_TRAIN))
        if bad:
            raise ValueError(
                f"{self.kind} candidate: unknown settings {bad}; architecture: "
                f"{sorted(_ARCH[self.kind])}, training: {sorted(_TRAIN)}"
            )

    @property
    def name(self) -> str:
        """E.g. ``transformer backbone=patchtst layers=2 lr=0.002``."""
        parts = [f"{k}={v}" for k, v in {**self.arch, **self.train}.items()]
        return " ".join([self.kind, *parts])

    def config(self, base: TrainConfig | None = None, *, seed: int) -> TrainConfig:
        settings = {**vars(base or TrainConfig()), **self.train, "seed": seed}
        return TrainConfig(**settings)


@dataclass
class Score:
    """How one candidate did on the validation set."""

    candidate: Candidate
    val_macro_f1: float
    val_accuracy: float
    params: int
    train_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.name,
            "kind": self.candidate.kind,
            "arch": dict(self.candidate.arch),
            "train": dict(self.candidate.train),
            "val_macro_f1": self.val_macro_f1,
            "val_accuracy": self.val_accuracy,
            "params": self.params,
            "train_s": round(self.train_s, 2),
        }


@dataclass
class Selection:
    """The chosen model (trained, in eval mode), its candidate and every candidate's score,
    in the order tried."""

    model: Classifier
    candidate: Candidate
    scores: list[Score]

    @property
    def best(self) -> Score:
        return next(s for s in self.scores if s.candidate == self.candidate)

    def table(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.scores]

    def format_table(self) -> str:
        head = "| candidate | params | val macro-F1 | train s | chosen |\n|---|---:|---:|---:|---|"
        lines = [
            f"| {s.candidate.name} | {s.params} | {100 * s.val_macro_f1:.2f} | "
            f"{s.train_s:.1f} | {'yes' if s.candidate == self.candidate else ''} |"
            for s in self.scores
        ]
        return "\n".join([head, *lines])


def parse_grid(
    items: Sequence[str], *, kind: str = "transformer", base: Mapping[str, Any] | None = None
) -> list[Candidate]:
    """Candidates from ``KEY=V1,V2`` strings, every combination in the order given:
    ``["layers=1,2", "lr=1e-3,3e-3"]`` gives four. KEY is an architecture field of
    ``kind`` or a TrainConfig setting; ``base`` holds the fields every candidate shares."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    axes: list[list[tuple[str, Any]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        types = {**_ARCH[kind], **_TRAIN}
        if not sep or not values.strip():
            raise ValueError(f"grid entry {item!r}: write KEY=V1,V2 (e.g. layers=1,2,4)")
        if key not in types:
            raise ValueError(
                f"grid entry {item!r}: unknown setting {key!r}; architecture: "
                f"{sorted(_ARCH[kind])}, training: {sorted(_TRAIN)}"
            )
        axes.append([(key, _parse_value(types[key], v.strip(), item)) for v in values.split(",")])
    out = []
    for combo in itertools.product(*axes):
        chosen = {**(base or {}), **dict(combo)}
        out.append(
            Candidate(
                kind,
                {k: v for k, v in chosen.items() if k in _ARCH[kind]},
                {k: v for k, v in chosen.items() if k in _TRAIN},
            )
        )
    for c in out:
        c.check()
    return out


def _parse_value(kind: Any, text: str, item: str) -> Any:
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if name == "int":
            return int(text)
        if name == "float":
            return float(text)
    except ValueError as exc:
        raise ValueError(f"grid entry {item!r}: {text!r} is not a {name}") from exc
    return text


def build_candidate(
    candidate: Candidate,
    *,
    window: int,
    channels: int,
    n_classes: int,
    x_normal: np.ndarray,
    seed: int,
) -> Classifier:
    """A fresh model of ``candidate``'s architecture, initial weights drawn from ``seed``,
    input standardisation from the normal windows."""
    candidate.check()
    torch.manual_seed(seed)
    shape: dict[str, Any] = {"window": window, "channels": channels, "n_classes": n_classes}
    model: Classifier
    if candidate.kind == "transformer":
        model = SensorTransformer(ModelSpec(**shape, **candidate.arch))
    else:
        model = WindowClassifier(ModelConfig(**shape, **candidate.arch))
    fit_input_stats(model, x_normal, channels)
    return model.eval()


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def select_model(
    candidates: Sequence[Candidate],
    *,
    x: np.ndarray,
    y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    class_names: list[str],
    seed: int = 0,
    base: TrainConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Train every candidate on ``x, y`` from ``seed`` and keep the best by macro-F1 on
    ``val_x, val_y`` (ties: fewer parameters, then the earlier candidate).

    ``base`` gives the training settings a candidate does not set. Raises DataError when
    the validation set is empty, lacks a class the training set has, or shares a window
    with the training set."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    _check_split(x, y, val_x, val_y, class_names)
    say = progress or (lambda _m: None)
    normal = x[y == 0]
    best: tuple[tuple[float, int, int], Classifier, Candidate] | None = None
    scores = []
    for i, c in enumerate(candidates):
        model = build_candidate(
            c,
            window=x.shape[1],
            channels=x.shape[2],
            n_classes=len(class_names),
            x_normal=normal,
            seed=seed,
        )
        t0 = time.perf_counter()
        train(model, x, y, c.config(base, seed=seed))
        ev = classification_metrics(val_y, predict(model, val_x), class_names)
        score = Score(c, ev.macro_f1, ev.accuracy, params_of(model), time.perf_counter() - t0)
        scores.append(score)
        say(f"{c.name}: validation macro-F1 {100 * ev.macro_f1:.2f} ({score.train_s:.0f} s)")
        key = (ev.macro_f1, -score.params, -i)
        if best is None or key > best[0]:
            best = (key, model, c)
    assert best is not None
    return Selection(model=best[1].eval(), candidate=best[2], scores=scores)


def _check_split(
    x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, class_names: list[str]
) -> None:
    if len(val_y) == 0:
        raise DataError("the validation set is empty: a choice needs windows to judge it on")
    if val_x.shape[1:] != x.shape[1:]:
        raise DataError(f"validation windows {val_x.shape[1:]} differ from training {x.shape[1:]}")
    if not (y == 0).any():
        raise DataError(f"the training set has no {class_names[0]!r} windows (class 0)")
    missing = sorted(set(np.unique(y).tolist()) - set(np.unique(val_y).tolist()))
    if missing:
        raise DataError(
            f"the validation set has no windows of {[class_names[i] for i in missing]}, "
            "which training has: macro-F1 on it would not judge them"
        )
    seen = {hashlib.sha256(w.tobytes()).digest() for w in np.ascontiguousarray(x)}
    shared = sum(hashlib.sha256(w.tobytes()).digest() in seen for w in np.ascontiguousarray(val_x))
    if shared:
        raise DataError(
            f"{shared} validation windows are also training windows: split by episode or "
            "time block, not by window"
        )
