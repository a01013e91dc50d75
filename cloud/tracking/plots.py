"""The plots every round's MLflow run carries: the golden set's confusion matrix and the
per-class recall."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def confusion_figure(confusion: np.ndarray, class_names: list[str]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(class_names), 1 + 0.6 * len(class_names)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8)
    ax.set_title("Golden set confusion matrix")
    fig.tight_layout()
    plt.close(fig)
    return fig


def recall_figure(confusion: np.ndarray, class_names: list[str]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(class_names), 3))
    ax.bar(range(len(class_names)), recall)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title("Per-class recall on the golden set")
    fig.tight_layout()
    plt.close(fig)
    return fig
