"""The pictures: training curves, confusion matrices, misclassified images, Grad-CAM heatmaps and
reliability diagrams; logged to MLflow and written as PNG files that DVC shows as image plots."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402

if TYPE_CHECKING:
    from pipeline.calibration import Calibration

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


def save_png(fig: Figure, path: Path, colours: int | None = None) -> None:
    """Write ``fig`` as a small PNG, whole or not at all. ``colours`` (at most 256) makes it a palette
    PNG: a picture of photos then takes a quarter of the bytes (the CI report inlines every picture,
    and GitHub takes at most 1 MiB)."""
    with atomic_path(Path(path)) as temporary:
        if colours is None:
            fig.savefig(temporary, format="png", dpi=PNG_DPI)
            return
        rendered = io.BytesIO()
        fig.savefig(rendered, format="png", dpi=PNG_DPI)
        with Image.open(rendered) as image:
            image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT).save(
                temporary, format="png", optimize=True)


@dataclass(frozen=True)
class HeatmapPanel:
    """One photo of a Grad-CAM picture, its heatmap (same height and width, 0 to 1) and caption."""

    image: np.ndarray
    heatmap: np.ndarray
    caption: str
    right: bool


def gradcam_grid(rows: Sequence[tuple[Sequence[HeatmapPanel], Sequence[HeatmapPanel]]], per_side: int,
                 title: str) -> Figure:
    """One row per class: its most confidently wrong photos on the left, its most confidently right
    ones on the right, each with its Grad-CAM heatmap over it (red: the evidence for the answer)."""
    count = max(1, len(rows))
    columns = 2 * per_side
    height = 2.0 * count + 0.7
    fig, axes = plt.subplots(count, columns, figsize=(1.8 * columns, height), squeeze=False, layout="constrained")
    for axis in axes.ravel():
        axis.axis("off")
    for row, (wrong, right) in zip(axes, rows):
        for axis, panel in [*zip(row[:per_side], wrong), *zip(row[per_side:], right)]:
            image = panel.image
            pixels = image[..., 0] if image.shape[-1] == 1 else image
            axis.imshow(pixels.astype(np.uint8), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
            axis.imshow(panel.heatmap, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
            axis.set_title(panel.caption, fontsize=8, color="darkgreen" if panel.right else "crimson")
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no test images", ha="center", va="center")
    fig.suptitle(f"{title}\nleft: most confidently wrong, right: most confidently right (true -> predicted "
                 "probability); heat: Grad-CAM of the predicted class", fontsize=10)
    plt.close(fig)
    return fig


def reliability_diagram(after: Calibration, title: str, before: Calibration | None = None,
                        temperature: float = 1.0) -> Figure:
    """Accuracy against confidence in bins, with the diagonal a calibrated model would follow, and the
    number of images in each bin below; ``before``, when given, is the same model without its temperature."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.asarray(after.bin_edges)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = [i for i, acc in enumerate(after.accuracy) if acc is not None]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    top.bar(centres[filled], [after.accuracy[i] for i in filled], width=width[filled], alpha=0.35,
            edgecolor="tab:blue", color="tab:blue")
    label = f"ECE {after.ece:.3f}, Brier {after.brier:.3f}" + (f" (temperature {temperature:.2f})" if before else "")
    top.plot([after.confidence[i] for i in filled], [after.accuracy[i] for i in filled], marker="o",
             color="tab:blue", label=label)
    if before is not None:
        shown = [i for i, acc in enumerate(before.accuracy) if acc is not None]
        top.plot([before.confidence[i] for i in shown], [before.accuracy[i] for i in shown], marker="s",
                 color="tab:orange", label=f"without temperature: ECE {before.ece:.3f}, Brier {before.brier:.3f}")
    top.set_ylabel("accuracy in the bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title)
    bottom.bar(centres, after.counts, width=width, color="tab:blue", alpha=0.6, edgecolor="tab:blue")
    for x, count in zip(centres, after.counts):
        if count:
            bottom.text(x, count, str(count), ha="center", va="bottom", fontsize=8)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    bottom.set_ylim(0, max(after.counts, default=0) * 1.25 + 1)
    fig.tight_layout()
    plt.close(fig)
    return fig
