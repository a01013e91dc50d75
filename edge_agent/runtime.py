"""Runs a verified model package with ONNX Runtime and scores each window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from shared.errors import PackageError
from shared.package import ModelPackage


@dataclass(frozen=True)
class Detection:
    """What the model made of one window."""

    predicted: str
    confidence: float  # max softmax
    energy: float  # -logsumexp(logits): higher means less like anything seen in training
    distance: float | None = None  # feature distance from normal operation (see below)


class ModelRuntime:
    """One loaded package; windows (B, T, C) float32 in, detections out."""

    def __init__(self, package: ModelPackage, *, threads: int = 1) -> None:
        self.package = package
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                package.graph, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own unexported error types
            raise PackageError(
                f"ONNX Runtime cannot load the graph: {exc}", reason="bad_graph"
            ) from exc
        self.input_name = self.session.get_inputs()[0].name
        spec = package.manifest.input
        self.shape = (spec.window, spec.channels)
        self.class_names = package.manifest.class_names
        ood = package.manifest.metadata.get("ood")
        self.ood: tuple[np.ndarray, np.ndarray, float] | None = None
        if ood:
            self.ood = (
                np.asarray(ood["feature_mean"]),
                np.asarray(ood["feature_std"]),
                float(ood["threshold"]),
            )

    @property
    def version(self) -> str:
        return self.package.version

    def logits(self, windows: np.ndarray) -> np.ndarray:
        if windows.ndim != 3 or windows.shape[1:] != self.shape:
            raise ValueError(
                f"windows must be (B, {self.shape[0]}, {self.shape[1]}), got {windows.shape}"
            )
        out = self.session.run(None, {self.input_name: windows.astype(np.float32, copy=False)})
        return np.asarray(out[0])

    def detect(self, windows: np.ndarray) -> list[Detection]:
        logits = self.logits(windows).astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        probs = np.exp(logits - lse[:, None])
        best = probs.argmax(axis=1)
        dist = self.distance(windows)
        return [
            Detection(
                self.class_names[int(k)],
                float(probs[i, k]),
                float(-lse[i]),
                None if dist is None else float(dist[i]),
            )
            for i, k in enumerate(best)
        ]

    def distance(self, windows: np.ndarray) -> np.ndarray | None:
        """Mean squared z-score of each window's channel levels and spreads against normal
        operation, in units of the package's calibrated threshold (over 1: out of
        distribution). None when the package carries no calibration."""
        if self.ood is None:
            return None
        mean, std, threshold = self.ood
        feats = np.concatenate([windows.mean(axis=1), windows.std(axis=1)], axis=1)
        return np.mean(((feats - mean) / std) ** 2, axis=1) / threshold

    def smoke_check(self) -> None:
        """Run one all-zero window; a package that cannot do this must not go live."""
        logits = self.logits(np.zeros((1, *self.shape), dtype=np.float32))
        if logits.shape != (1, len(self.class_names)) or not np.isfinite(logits).all():
            raise PackageError(
                f"smoke check gave logits of shape {logits.shape}, expected "
                f"(1, {len(self.class_names)}) finite",
                reason="smoke_check_failed",
            )
