"""Runs a verified model package with ONNX Runtime and scores each window."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from edge_agent.scoring import scorers_for
from shared.errors import DataError, PackageError
from shared.features import window_features
from shared.package import ModelPackage, input_range

_F32 = np.dtype(np.float32)


class Detection(NamedTuple):
    """What the model made of one window, and every anomaly score the package supports.
    (A named tuple: one is built per window, at a quarter of a frozen dataclass's cost.)"""

    predicted: str
    confidence: float  # max softmax probability
    scores: dict[str, float]
    features: np.ndarray | None = None  # (2C,) channel means and spreads, when the graph has them
    # A value outside the package's input range: clipped before scoring (the sensor's
    # fault, not the model's), and the selector uploads the window as "ood".
    out_of_range: bool = False


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
        self.scorers = scorers_for(package.manifest.metadata)
        # (low, high) per channel, or None for a package that carries no range.
        self.range = input_range(package.manifest)
        outputs = self.outputs = [o.name for o in self.session.get_outputs()]
        # Packages from edgeloop's cloud compute the scores in the graph (one ORT call, no
        # per-window numpy); any other ONNX classifier gets them from edge_agent.scoring.
        self.graph_scores = outputs[1:] == ["energy", "confidence", "distance", "features"]

    @property
    def version(self) -> str:
        return self.package.version

    def logits(self, windows: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(windows.astype(np.float32, copy=False))[0])

    def detect(self, windows: np.ndarray) -> list[Detection]:
        # This runs on every window: one ORT call, then plain Python on a few numbers.
        if windows.dtype is not _F32:  # an identity test: astype(copy=False) costs 0.3 µs
            windows = windows.astype(np.float32)
        windows, flagged = self.clip(windows)
        if self.graph_scores:
            logits, energy, confidence, distance, features = self._run(windows)
            if len(logits) == 1:  # the agent's path, once per window: no per-column lists
                one = self._one(logits, energy.item(), confidence.item(), distance.item(), features)
                return [one if flagged is None else one._replace(out_of_range=bool(flagged[0]))]
            scores = {"energy": energy, "max_softmax": 1.0 - confidence, "distance": distance}
        else:
            logits = self._run(windows)[0]
            features = None
            stats = window_features(windows)
            scores = {name: fn(logits, stats) for name, fn in self.scorers.items()}
            confidence = 1.0 - scores["max_softmax"]
        columns = {name: v.tolist() for name, v in scores.items()}
        # A NaN or infinite logit makes the energy (-logsumexp) NaN or infinite too.
        if not all(map(math.isfinite, columns["energy"])):
            raise PackageError("the model produced non-finite logits", reason="bad_output")
        best = logits.argmax(axis=1).tolist()
        conf = confidence.tolist()
        out = [False] * len(best) if flagged is None else flagged.tolist()
        return [
            Detection(
                self.class_names[k],
                conf[i],
                {name: col[i] for name, col in columns.items()},
                None if features is None else features[i],
                out[i],
            )
            for i, k in enumerate(best)
        ]

    def clip(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``windows`` (B, T, C) clipped into the package's input range, and which of them
        held a finite value outside it ((B,) bool; None when none did, the common case,
        which costs two comparisons). NaN or infinity is the sensor's fault too, but not a
        value to clip: DataError ``non_finite``."""
        if self.range is None:
            return windows, None
        low, high = self.range
        if (windows >= low).all() and (windows <= high).all():  # NaN fails both
            return windows, None
        if not np.isfinite(windows).all():
            raise DataError("window holds NaN or infinity", reason="non_finite")
        flagged = np.asarray(((windows > high) | (windows < low)).any(axis=(1, 2)))
        return np.clip(windows, low, high), flagged

    def _one(
        self, logits: np.ndarray, energy: float, confidence: float, distance: float, features
    ) -> Detection:
        if not math.isfinite(energy):
            raise PackageError("the model produced non-finite logits", reason="bad_output")
        return Detection(
            self.class_names[int(logits.argmax())],
            confidence,
            {"energy": energy, "max_softmax": 1.0 - confidence, "distance": distance},
            features[0],
        )

    def _run(self, windows: np.ndarray) -> list[np.ndarray]:
        if windows.ndim != 3 or windows.shape[1:] != self.shape:
            raise ValueError(
                f"windows must be (B, {self.shape[0]}, {self.shape[1]}), got {windows.shape}"
            )
        try:
            return self.session.run(self.outputs, {self.input_name: windows})
        except Exception as exc:  # ORT's errors share no base class but Exception
            raise PackageError(f"ONNX Runtime failed: {exc}", reason="bad_output") from exc

    def smoke_check(self) -> None:
        """Run one all-zero window; a package that cannot do this must not go live."""
        try:
            logits = self.logits(np.zeros((1, *self.shape), dtype=np.float32))
        except PackageError as exc:
            raise PackageError(f"smoke check failed: {exc}", reason="smoke_check_failed") from exc
        if logits.shape != (1, len(self.class_names)) or not np.isfinite(logits).all():
            raise PackageError(
                f"smoke check gave logits of shape {logits.shape}, expected "
                f"(1, {len(self.class_names)}) finite",
                reason="smoke_check_failed",
            )
