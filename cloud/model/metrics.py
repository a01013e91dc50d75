"""Classification figures every gate and report uses: accuracy, macro-F1, per-class recall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Evaluation:
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    confusion: np.ndarray

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_accuracy": self.accuracy, f"{prefix}_macro_f1": self.macro_f1}
        out.update({f"{prefix}_recall_{k}": v for k, v in self.recall.items()})
        return out


def classification_metrics(y: np.ndarray, pred: np.ndarray, class_names: list[str]) -> Evaluation:
    """Macro-F1 over the classes present in ``y``; recall per present class."""
    k = len(class_names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    present = confusion.sum(axis=1) > 0
    tp = np.diag(confusion).astype(float)
    recall = tp / np.maximum(confusion.sum(axis=1), 1)
    precision = tp / np.maximum(confusion.sum(axis=0), 1)
    f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision + 1e-12), 0)
    return Evaluation(
        accuracy=float((pred == y).mean()),
        macro_f1=float(f1[present].mean()),
        recall={c: float(recall[i]) for i, c in enumerate(class_names) if present[i]},
        confusion=confusion,
    )
