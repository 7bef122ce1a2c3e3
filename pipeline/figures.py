"""The pictures: training curves, confusion matrices, misclassified images; logged to MLflow and
written as PNG files that DVC shows as image plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402

# Pictures committed to git (DVC plots with cache: false) and shown in CI summaries: small files.
PNG_DPI = 72


def training_curves(history: pd.DataFrame, title: str) -> Figure:
    """Loss and accuracy per epoch, training against validation: the deck's overfitting picture."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        axis.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"validation {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A labelled confusion matrix (rows: actual class, columns: predicted class)."""
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=axis, colorbar=False, xticks_rotation=45)
    axis.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def misclassified_grid(images: np.ndarray, actual: Sequence[str], predicted: Sequence[str], title: str,
                       limit: int = 25) -> Figure:
    """Up to ``limit`` wrongly classified images, each captioned 'true -> predicted'."""
    count = min(len(images), limit)
    columns = max(1, min(5, count))
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, true, guess in zip(axes.ravel(), images[:count], actual, predicted):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        axis.imshow(pixels, cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        axis.set_title(f"{true} -> {guess}", fontsize=9, color="crimson")
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a small PNG, whole or not at all."""
    with atomic_path(Path(path)) as temporary:
        fig.savefig(temporary, format="png", dpi=PNG_DPI)
